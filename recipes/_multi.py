"""The two-teacher baselines' config (IB-KD's teachers, a fixed fusion rule) and the teachers' logits.

Their driver is :func:`recipes._distill.run_distillation`, the one every distillation baseline uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd.config import ModelConfig
from kd.modeling import Net
from kd.teacher_outputs import frozen_teacher
from kd.teachers import TwoTeachersConfig

from ._distill import run_distillation  # noqa: F401  (re-exported for the recipes)


@dataclass(frozen=True)
class TwoTeacherConfig(TwoTeachersConfig):
    """A student distilled from IB-KD's two fine-tuned teachers by a fixed rule (no learned fusion)."""

    label_smoothing: float = 0.0
    """Label smoothing of the student's cross-entropy."""
    grad_clip_norm: float = 0.0
    """Global gradient-norm clipping threshold (0 = off)."""
    ema: bool = True
    """Keep an EMA of the student (and its BN statistics), reported beside the raw weights."""


def two_teachers(cfg: TwoTeacherConfig) -> dict[str, tuple[ModelConfig, str]]:
    return {"teacher1": (cfg.teacher1, cfg.teacher1_ckpt), "teacher2": (cfg.teacher2, cfg.teacher2_ckpt)}


def frozen_teacher_logits(teachers: dict[str, Net], frozen: dict, batch: dict) -> list[torch.Tensor]:
    """Every frozen teacher's logits on ``batch["x"]`` (eval mode, no gradient; read from the batch when
    shared, see :mod:`kd.teacher_outputs`), in the order of ``teachers``."""
    return [frozen_teacher(name, net, frozen, batch)[0] for name, net in teachers.items()]
