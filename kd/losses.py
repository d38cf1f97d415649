"""Distillation losses and the schedules of IB-KD stage B (SPEC 6-7), as pure tensor functions.

The AT and IB latent/KD terms live in :mod:`kernels` (fused Triton on a GPU, the pure-torch reference
elsewhere); this module holds the rest. Every schedule takes 0-d tensors so it runs inside the compiled
step without recompiling.
"""

from __future__ import annotations

import torch.nn.functional as F
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
