"""Hinton KD: ``(1-a)*CE + a*T^2*KL(teacher || student)`` from one fine-tuned teacher (T 4, a 0.9)."""

from __future__ import annotations

from dataclasses import dataclass

from ..losses import hinton_kd
from ..step import mixed_cross_entropy
from .base import ONE_TEACHER, DistillConfig, Loss, Method, forward_pair


@dataclass(frozen=True)
class KDConfig(DistillConfig):
    """Hinton knowledge distillation."""

    temperature: float = 4.0
    """Softmax temperature T of the KL term (scaled by T^2)."""
    alpha: float = 0.9
    """Weight a of the KL term; the cross-entropy gets 1 - a."""


def make_loss(cfg: KDConfig, student, teachers, device, total_steps):
    teacher = teachers["teacher"]

    def loss_fn(params, buffers, frozen, batch, step):
        teacher_logits, _, logits, _, new_buffers = forward_pair(student, teacher, params, buffers, frozen, batch)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        kd = hinton_kd(logits, teacher_logits, cfg.temperature)
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        return loss, (new_buffers, {"ce": ce.detach(), "kd": kd.detach()})
    return Loss(loss_fn)


METHOD = Method("kd", make_loss, ONE_TEACHER)
