"""Attention Transfer baseline (Zagoruyko & Komodakis, p=2): CE + beta * sum over stage pairs of L_AT."""

from __future__ import annotations

from dataclasses import dataclass

import kernels

from ..errors import ConfigError
from ..models import STAGES, feature_shapes
from ..step import mixed_cross_entropy
from .base import ONE_TEACHER, DistillConfig, Loss, Method, forward_pair


@dataclass(frozen=True)
class ATConfig(DistillConfig):
    """Attention transfer from one fine-tuned teacher."""

    stages: tuple[str, ...] = ("stage2", "stage3", "stage4")
    """Stage pairs (student stage k <-> teacher stage k); the student map is pooled to the teacher's size."""
    beta: float = 1000.0
    """Weight of the summed AT losses."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"stages must be a non-empty subset of {STAGES}, got {self.stages}")


def make_loss(cfg: ATConfig, student, teachers, device, total_steps):
    teacher = teachers["teacher"]
    for net in (student, teacher):
        missing = [s for s in cfg.stages if s not in feature_shapes(net.eval_skeleton)]
        if missing:
            raise ConfigError(f"{net.arch} exposes no feature maps {missing} (generic models may only have 'pooled')")

    def loss_fn(params, buffers, frozen, batch, step):
        _, teacher_features, logits, features, new_buffers = forward_pair(student, teacher, params, buffers, frozen,
                                                                          batch, maps=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        at = kernels.attention_transfer_loss([features[s] for s in cfg.stages],
                                             [teacher_features[s] for s in cfg.stages], backend=cfg.kernels)
        loss = ce + cfg.beta * at
        return loss, (new_buffers, {"ce": ce.detach(), "at": at.detach()})
    return Loss(loss_fn)


METHOD = Method("at", make_loss, ONE_TEACHER, maps=True)
