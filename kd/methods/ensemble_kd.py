"""Ensemble KD: Hinton KD towards the teachers' averaged probabilities, (1-a)*CE + a*T^2*KL(mean_i p_i || student).

The fixed-rule fusion of IB-KD's two teachers by default (any number from two; T 4, a 0.9, as recipes.kd): the
baseline the MBM has to beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.reference import distillation_kl
from ..step import apply_model, mixed_cross_entropy
from ..teachers import SPEC_TEACHERS, TeacherSpec
from .base import TWO_OR_MORE, DistillConfig, Loss, Method, frozen_teacher_logits


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


@dataclass(frozen=True)
class EnsembleKDConfig(DistillConfig):
    """Hinton knowledge distillation from the average of the teachers (two by default, any number from two)."""

    teachers: tuple[TeacherSpec, ...] = SPEC_TEACHERS
    """The frozen teachers in order: --teachers.0.arch / --teachers.0.ckpt, --teachers.1.arch, ..."""

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


METHOD = Method("ensemble_kd", make_loss, TWO_OR_MORE)
