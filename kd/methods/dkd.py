"""Decoupled KD (Zhao et al., CVPR 2022): CE + warm * (alpha * TCKD + beta * NCKD) from one fine-tuned teacher.

TCKD distils the binary target-vs-rest probabilities, NCKD the distribution over the non-target classes;
Hinton's KD weights NCKD by the teacher's (small) non-target mass, DKD gives it its own weight beta.
Defaults are mdistiller's CIFAR-100 ones (alpha 1, beta 8, T 4, warm-up over 20 of 240 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..losses import linear_warmup, mixed_dkd_terms
from ..step import mixed_cross_entropy
from .base import DistillConfig, Loss, Method, forward_pair, one_teacher


@dataclass(frozen=True)
class DKDConfig(DistillConfig):
    """Decoupled knowledge distillation."""

    alpha: float = 1.0
    """Weight of TCKD (target-class KD: the binary target-vs-rest probabilities)."""
    beta: float = 8.0
    """Weight of NCKD (non-target-class KD: the softmax over the non-target classes)."""
    temperature: float = 4.0
    """Softmax temperature T of both KL terms (each scaled by T^2)."""
    warmup_frac: float = 20 / 240
    """Fraction of training over which the DKD weight ramps linearly from 0 to 1 (mdistiller: 20 of 240 epochs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise ConfigError(f"warmup_frac must be in [0, 1], got {self.warmup_frac}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


def make_loss(cfg: DKDConfig, student, teachers, device, total_steps: int):
    teacher = teachers["teacher"]

    def loss_fn(params, buffers, frozen, batch, step):
        teacher_logits, _, logits, _, new_buffers = forward_pair(student, teacher, params, buffers, frozen, batch)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        tckd, nckd = mixed_dkd_terms(logits, teacher_logits, batch, cfg.temperature)
        warm = linear_warmup(step, total_steps, cfg.warmup_frac)
        loss = ce + warm * (cfg.alpha * tckd + cfg.beta * nckd)
        return loss, (new_buffers, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "warm": warm})
    return Loss(loss_fn)


METHOD = Method("dkd", one_teacher, make_loss)
