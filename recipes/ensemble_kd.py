"""Ensemble KD: Hinton KD towards both teachers' averaged probabilities, (1-a)*CE + a*T^2*KL(mean_i p_i || student).

The fixed-rule fusion of IB-KD's two teachers (T 4, a 0.9, as recipes.kd): the baseline the MBM has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd.losses import ensemble_kd
from kd.step import apply_model, mixed_cross_entropy

from ._cli import parse
from ._distill import STUDENT_DATA, STUDENT_OPTIM
from ._multi import TwoTeacherConfig, frozen_teacher_logits, run_distillation, two_teachers


@dataclass(frozen=True)
class EnsembleKDConfig(TwoTeacherConfig):
    """Hinton knowledge distillation from the average of two teachers."""

    temperature: float = 4.0
    """Softmax temperature T of the teachers' probabilities and of the KL term (scaled by T^2)."""
    alpha: float = 0.9
    """Weight a of the KL term; the cross-entropy gets 1 - a."""


CONFIG = EnsembleKDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def ensemble_objective(cfg: EnsembleKDConfig, student, teachers, device, total_steps: int):
    def loss_fn(params, buffers, frozen, batch, step):
        targets = frozen_teacher_logits(teachers, frozen, batch)
        logits, _, student_buffers = apply_model(student.train_skeleton, params["student"], buffers["student"],
                                                 batch["x"], train=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        kd = ensemble_kd(logits, targets, cfg.temperature)
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        return loss, ({**buffers, "student": student_buffers}, {"ce": ce.detach(), "kd": kd.detach()})
    return loss_fn, {}, {}


def run(cfg: EnsembleKDConfig, recipe: str = "ensemble_kd") -> dict:
    return run_distillation(cfg, recipe, two_teachers, ensemble_objective)


def main(argv=None, prog="launch.py recipes.ensemble_kd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
