"""Distillation losses and the schedules of IB-KD stage B (SPEC 6-7), as pure tensor functions.

The AT and IB latent/KD terms live in :mod:`kernels` (fused Triton on a GPU, the pure-torch reference
elsewhere); this module holds the rest. Every schedule takes 0-d tensors so it runs inside the compiled
step without recompiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor | float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes, mean over the batch."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return kl * temperature**2


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
    return F.normalize(feature_map.float().flatten(2), dim=2).view_as(feature_map)


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
