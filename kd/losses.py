"""Distillation losses and the schedules of IB-KD stage B (SPEC 6-7), as pure tensor functions.

The AT and IB latent/KD terms live in :mod:`kernels` (fused Triton on a GPU, the pure-torch reference
elsewhere); this module holds the rest. Every schedule takes 0-d tensors so it runs inside the compiled
step without recompiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kernels.reference import distillation_kl


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, mean over the batch."""
    return distillation_kl(student_logits, F.log_softmax(teacher_logits.float() / temperature, dim=1), temperature)


def pool_to(student_map: Tensor, size: tuple[int, int]) -> Tensor:
    """Adaptive average pooling of a student map to the teacher's spatial size (identity when equal)."""
    if tuple(student_map.shape[-2:]) == tuple(size):
        return student_map
    return F.adaptive_avg_pool2d(student_map, size)


def fitnet_hint(regressed_student: Tensor, teacher_map: Tensor) -> Tensor:
    """``MSE(pool(reg(f_s)), f_t)``, mean over all elements; the teacher is a constant."""
    pooled = pool_to(regressed_student, teacher_map.shape[-2:])
    return F.mse_loss(pooled.float(), teacher_map.detach().float())


def channel_normalized(feature_map: Tensor) -> Tensor:
    """Each channel's spatial map scaled to unit L2 norm: (N, C, H, W) -> same shape."""
    flat = rearrange(feature_map.float(), "n c h w -> n c (h w)")
    return F.normalize(flat, dim=2).view_as(feature_map)


def feature_alignment(adapted_student: Tensor, teacher_map: Tensor) -> Tensor:
    """IB-KD's optional feature term: MSE between per-channel L2-normalised maps (student adapted by a
    learned 1x1 conv to the teacher's channels, pooled to its size). Gradients reach the student."""
    student = channel_normalized(pool_to(adapted_student, teacher_map.shape[-2:]))
    return F.mse_loss(student, channel_normalized(teacher_map.detach()))


# ----------------------------------------------------------------------------------------------
# IB-KD stage-B schedules. r = step / (total_steps - 1) is the training progress in [0, 1].


def progress(step: Tensor, total_steps: int) -> Tensor:
    return (step.float() / max(1, total_steps - 1)).clamp(0.0, 1.0)


def lerp(start: float, end: float, weight: Tensor) -> Tensor:
    return start + (end - start) * weight


def kd_ramp(r: Tensor, warmup_frac: float, power: float) -> Tensor:
    """``p = (max(0, r - w) / (1 - w)) ** pow``: 0 during the KD warm-up, 1 at the end."""
    return ((r - warmup_frac).clamp(min=0.0) / max(1e-12, 1 - warmup_frac)) ** power


def latent_weight(r: Tensor, latent_alpha: float, start: float = 0.3) -> Tensor:
    """0 while ``r < start``, then linear to ``latent_alpha`` at ``r = 1``."""
    return latent_alpha * ((r - start).clamp(min=0.0) / (1 - start))


def clip_threshold(r: Tensor, init: float, final: float, warmup_frac: float) -> Tensor:
    """``init`` while ``r < warmup_frac``, then linear to ``final`` at ``r = 1``.

    A threshold that reaches 0 means "no clipping" downstream (see :func:`kd.step.clip_coefficient`):
    the original drove the threshold towards 0 and clipped every gradient to nothing.
    """
    ramp = ((r - warmup_frac).clamp(min=0.0) / max(1e-12, 1 - warmup_frac))
    return init + (final - init) * ramp


# ----------------------------------------------------------------------------------------------
# Decoupled KD (Zhao et al., CVPR 2022) and ensemble KD (SPEC 7).


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


def linear_warmup(step: Tensor, total_steps: int, warmup_frac: float) -> Tensor:
    """0 at step 0, linear to 1 at progress ``r = warmup_frac`` (r = step / (total_steps - 1)), then 1.
    ``warmup_frac = 0`` means no warm-up (1 from the first step)."""
    r = progress(step, total_steps)
    if warmup_frac <= 0:
        return torch.ones_like(r)
    return (r / warmup_frac).clamp(max=1.0)


def ensemble_kd(student_logits: Tensor, teacher_logits: list[Tensor] | tuple[Tensor, ...],
                temperature: Tensor | float) -> Tensor:
    """``T^2 * KL(mean_i softmax(t_i/T) || softmax(s/T))``, summed over classes, batch mean: Hinton's KD
    towards the teachers' averaged probabilities (equal to :func:`hinton_kd` for one teacher or identical
    teachers). The average is taken in probability space, its log as a log-sum-exp of the teachers'
    log-probabilities (no ``log(0)``). The teachers are constants."""
    log_p_teachers = torch.stack([F.log_softmax(t.detach().float() / temperature, dim=1)
                                  for t in teacher_logits])  # (K, N, C)
    log_target = torch.logsumexp(log_p_teachers, dim=0) - torch.log(torch.tensor(float(len(teacher_logits))))
    return distillation_kl(student_logits, log_target, temperature)
