"""Hinton KD baseline: (1-a)*CE + a*T^2*KL(teacher || student) from one fine-tuned teacher (T 4, a 0.9)."""

from __future__ import annotations

from dataclasses import dataclass

from kd.losses import hinton_kd
from kd.step import mixed_cross_entropy

from ._cli import parse
from ._distill import STUDENT_DATA, STUDENT_OPTIM, DistillConfig, forward_pair, run_single_teacher


@dataclass(frozen=True)
class KDConfig(DistillConfig):
    """Hinton knowledge distillation."""

    temperature: float = 4.0
    """Softmax temperature T of the KL term (scaled by T^2)."""
    alpha: float = 0.9
    """Weight a of the KL term; the cross-entropy gets 1 - a."""


CONFIG = KDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def hinton_loss(cfg: KDConfig, student, teacher, device):
    def loss_fn(params, buffers, frozen, batch, step):
        teacher_logits, _, logits, _, new_buffers = forward_pair(student, teacher, params, buffers, frozen, batch)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        kd = hinton_kd(logits, teacher_logits, cfg.temperature)
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        return loss, (new_buffers, {"ce": ce.detach(), "kd": kd.detach()})
    return loss_fn, {}, {}


def run(cfg: KDConfig, recipe: str = "kd") -> dict:
    return run_single_teacher(cfg, recipe, hinton_loss)


def main(argv=None, prog="launch.py recipes.kd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
