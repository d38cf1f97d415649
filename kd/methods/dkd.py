"""Decoupled KD (Zhao et al., CVPR 2022): CE + warm * (alpha * TCKD + beta * NCKD) from one fine-tuned teacher.

TCKD distils the binary target-vs-rest probabilities, NCKD the distribution over the non-target classes;
Hinton's KD weights NCKD by the teacher's (small) non-target mass, DKD gives it its own weight beta.
Defaults are mdistiller's CIFAR-100 ones (alpha 1, beta 8, T 4, warm-up over 20 of 240 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..optim import progress, ramp
from ..step import mixed_cross_entropy
from .base import ONE_TEACHER, DistillConfig, Loss, Method, forward_pair


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: Tensor | float
              ) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)`` of Decoupled KD, each ``T^2 * KL(teacher || student)`` summed over classes, batch mean.

    With ``p = softmax(logits / T)`` and ``t`` the target class of a sample:
        TCKD = T^2 * KL([p_t, 1 - p_t]_teacher || [p_t, 1 - p_t]_student)     binary: target vs the rest
        NCKD = T^2 * KL(q_teacher || q_student),  q_j = p_j / (1 - p_t) for j != t (softmax over non-targets)
    Hinton's KD is ``TCKD + (1 - p_t^teacher) * NCKD``: a confident teacher suppresses the non-target
    knowledge, which DKD's separate weights undo. As in mdistiller, the non-target softmax lowers the
    target logit (at temperature T) by 1000, giving it probability 0. The binary log-probabilities are
    log-sum-exps (``log(1 - p_t) = logsumexp_{j != t} - logsumexp_j``), never ``log(1 - p_t)``, so a
    confident network gives no ``log(0)``. The teacher is a constant.
    """
    # fp32 at least (bf16/fp16 logits are upcast), fp64 kept: an fp64 check of the loss means what it says.
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student = student_logits.to(dtype) / temperature  # (N, C)
    teacher = teacher_logits.detach().to(dtype) / temperature
    target_mask = F.one_hot(target, student.shape[1]).to(student.dtype)  # (N, C), 1 at the target class

    def log_binary_and_nontarget(scaled: Tensor) -> tuple[Tensor, Tensor]:
        without_target = scaled - 1000.0 * target_mask
        log_total = torch.logsumexp(scaled, dim=1)
        log_p_target = (scaled * target_mask).sum(dim=1) - log_total
        log_p_other = torch.logsumexp(without_target, dim=1) - log_total
        return torch.stack([log_p_target, log_p_other], dim=1), F.log_softmax(without_target, dim=1)

    log_binary_s, log_nontarget_s = log_binary_and_nontarget(student)  # (N, 2), (N, C)
    log_binary_t, log_nontarget_t = log_binary_and_nontarget(teacher)
    tckd = (log_binary_t.exp() * (log_binary_t - log_binary_s)).sum(dim=1).mean()
    nckd = (log_nontarget_t.exp() * (log_nontarget_t - log_nontarget_s)).sum(dim=1).mean()
    return tckd * temperature**2, nckd * temperature**2


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: Tensor | float) -> Tensor:
    """``alpha * TCKD + beta * NCKD`` (see :func:`dkd_terms`); the recipe adds CE and the warm-up weight."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def mixed_dkd_terms(student_logits: Tensor, teacher_logits: Tensor, batch: dict[str, Tensor],
                    temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    """DKD's terms on mixup / CutMix targets: ``lam * term(y_a) + (1 - lam) * term(y_b)`` for TCKD and NCKD
    (both depend on the target class, unlike Hinton's KD)."""
    tckd_a, nckd_a = dkd_terms(student_logits, teacher_logits, batch["y_a"], temperature)
    tckd_b, nckd_b = dkd_terms(student_logits, teacher_logits, batch["y_b"], temperature)
    lam = batch["lam"]
    return lam * tckd_a + (1 - lam) * tckd_b, lam * nckd_a + (1 - lam) * nckd_b


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
        warm = ramp(progress(step, total_steps), 0.0, cfg.warmup_frac)  # 0 -> 1 over the warm-up
        loss = ce + warm * (cfg.alpha * tckd + cfg.beta * nckd)
        return loss, (new_buffers, {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "warm": warm})
    return Loss(loss_fn)


METHOD = Method("dkd", make_loss, ONE_TEACHER)
