"""FitNets baseline: CE + alpha_hint * MSE(pool(regressor(student stage)), teacher stage); single-stage.

The original FitNets trains the hint first and the classifier second; like the peer CIFAR tables, this
recipe trains both at once (one stage). The 1x1 regressor is built from the known feature shapes
before training and saved with the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import pool_to
from ..models import feature_shapes
from ..step import call_stateless, mixed_cross_entropy
from .base import ONE_TEACHER, DistillConfig, Loss, Method, forward_pair


def fitnet_hint(regressed_student: Tensor, teacher_map: Tensor) -> Tensor:
    """``MSE(pool(reg(f_s)), f_t)``, mean over all elements; the teacher is a constant."""
    pooled = pool_to(regressed_student, teacher_map.shape[-2:])
    return F.mse_loss(pooled.float(), teacher_map.detach().float())


@dataclass(frozen=True)
class FitNetConfig(DistillConfig):
    """FitNets hint learning from one fine-tuned teacher."""

    hint_stage: str = "stage2"
    """Student and teacher stage whose maps are matched."""
    alpha_hint: float = 50.0
    """Weight of the hint MSE (the peer CIFAR tables use 100)."""


def build_regressor(student_channels: int, teacher_channels: int, device: torch.device) -> nn.Module:
    """1x1 conv from the student's channels to the teacher's, built eagerly from known shapes."""
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=True).to(device)


def make_loss(cfg: FitNetConfig, student, teachers, device, total_steps):
    teacher = teachers["teacher"]
    student_channels = feature_shapes(student.eval_skeleton)[cfg.hint_stage][1]
    teacher_channels = feature_shapes(teacher.eval_skeleton)[cfg.hint_stage][1]
    regressor = build_regressor(student_channels, teacher_channels, device).train()

    def loss_fn(params, buffers, frozen, batch, step):
        _, teacher_features, logits, features, new_buffers = forward_pair(student, teacher, params, buffers, frozen,
                                                                          batch, maps=True)
        regressed, _ = call_stateless(regressor, params["regressor"], {}, features[cfg.hint_stage], train=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        hint = fitnet_hint(regressed, teacher_features[cfg.hint_stage])
        loss = ce + cfg.alpha_hint * hint
        return loss, (new_buffers, {"ce": ce.detach(), "hint": hint.detach()})

    return Loss(loss_fn, params={"regressor": {k: v.detach() for k, v in regressor.named_parameters()}},
                buffers={"regressor": {}})


METHOD = Method("fitnet", make_loss, ONE_TEACHER, maps=True)
