"""CA-MKD (Zhang, Chen and Wang, ICASSP 2022), its logit part: a confidence-aware weighting of the teachers.

Per sample, each teacher k is weighted by how well it predicts the label, from its cross-entropy L_k:

    w_k = (1 - softmax_k(L_1, ..., L_K)) / (K - 1)          (the weights of a sample sum to 1)
    KD  = (1 / K) * sum_k w_k * T^2 * KL(softmax(t_k / T) || softmax(s / T)),   mean over the batch
    loss = ce_weight * CE + alpha * KD

as the authors' code computes it (their per-sample sum over teachers divided by batch size times K). Under
mixup / CutMix each L_k is ``lam * CE(t_k, y_a) + (1 - lam) * CE(t_k, y_b)``. The paper's intermediate-feature
term (teacher classifiers applied to adapted student features) is not included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..step import apply_model, mixed_cross_entropy
from ..teachers import SPEC_TEACHERS, TeacherSpec
from .base import TWO_OR_MORE, DistillConfig, Loss, Method, frozen_teacher_logits


@dataclass(frozen=True)
class CAMKDConfig(DistillConfig):
    """Confidence-aware multi-teacher KD (logit part; two teachers by default, any number from two)."""

    teachers: tuple[TeacherSpec, ...] = SPEC_TEACHERS
    """The frozen teachers in order: --teachers.0.arch / --teachers.0.ckpt, --teachers.1.arch, ..."""

    temperature: float = 4.0
    """Softmax temperature T of the KL terms (each scaled by T^2)."""
    alpha: float = 1.0
    """Weight of the confidence-weighted KD term (paper: 1)."""
    ce_weight: float = 1.0
    """Weight of the student's cross-entropy (paper: 1)."""


def teacher_weights(teacher_logits: list[Tensor], batch: dict[str, Tensor]) -> Tensor:
    """``(K, N)`` per-sample teacher weights ``(1 - softmax_k(L_k)) / (K - 1)`` from each teacher's (mixed)
    label cross-entropy; constants (no gradient)."""
    lam = batch["lam"]
    losses = torch.stack([lam * F.cross_entropy(t.detach().float(), batch["y_a"], reduction="none")
                          + (1 - lam) * F.cross_entropy(t.detach().float(), batch["y_b"], reduction="none")
                          for t in teacher_logits])  # (K, N)
    return (1.0 - torch.softmax(losses, dim=0)) / (len(teacher_logits) - 1)


def per_sample_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` per sample, shape (N,)."""
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2


def camkd_kd(student_logits: Tensor, teacher_logits: list[Tensor], batch: dict[str, Tensor],
             temperature: float) -> tuple[Tensor, Tensor]:
    """``(KD, weights)``: the confidence-weighted KD term (a 0-d tensor) and the ``(K, N)`` weights."""
    weights = teacher_weights(teacher_logits, batch)
    kl = torch.stack([per_sample_kl(student_logits, t, temperature) for t in teacher_logits])  # (K, N)
    return (weights * kl).sum(dim=0).mean() / len(teacher_logits), weights


def make_loss(cfg: CAMKDConfig, student, teachers, device, total_steps: int) -> Loss:
    def loss_fn(params, buffers, frozen, batch, step):
        targets = frozen_teacher_logits(teachers, frozen, batch)
        logits, _, student_buffers = apply_model(student.train_skeleton, params["student"], buffers["student"],
                                                 batch["x"], train=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        kd, weights = camkd_kd(logits, targets, batch, cfg.temperature)
        loss = cfg.ce_weight * ce + cfg.alpha * kd
        return loss, ({**buffers, "student": student_buffers},
                      {"ce": ce.detach(), "kd": kd.detach(), "teacher1_weight": weights[0].mean()})
    return Loss(loss_fn)


METHOD = Method("camkd", make_loss, TWO_OR_MORE)
