"""Ensemble KD: Hinton KD towards both teachers' averaged probabilities, (1-a)*CE + a*T^2*KL(mean_i p_i || student).

The fixed-rule fusion of IB-KD's two teachers (T 4, a 0.9, as recipes.kd): the baseline the MBM has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import ensemble_kd
from ..step import apply_model, mixed_cross_entropy
from .base import Loss, Method, TwoTeacherConfig, frozen_teacher_logits, two_teachers


@dataclass(frozen=True)
class EnsembleKDConfig(TwoTeacherConfig):
    """Hinton knowledge distillation from the average of two teachers."""

    temperature: float = 4.0
    """Softmax temperature T of the teachers' probabilities and of the KL term (scaled by T^2)."""
    alpha: float = 0.9
    """Weight a of the KL term; the cross-entropy gets 1 - a."""


def make_loss(cfg: EnsembleKDConfig, student, teachers, device, total_steps: int):
    def loss_fn(params, buffers, frozen, batch, step):
        targets = frozen_teacher_logits(teachers, frozen, batch)
        logits, _, student_buffers = apply_model(student.train_skeleton, params["student"], buffers["student"],
                                                 batch["x"], train=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        kd = ensemble_kd(logits, targets, cfg.temperature)
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        return loss, ({**buffers, "student": student_buffers}, {"ce": ce.detach(), "kd": kd.detach()})
    return Loss(loss_fn)


METHOD = Method("ensemble_kd", two_teachers, make_loss)
