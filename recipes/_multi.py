"""Driver of the distillation baselines whose loss reads several frozen teachers or the run's length.

``run_single_teacher`` (recipes/_distill.py) hands its loss one teacher and no step count. DKD needs the
total number of steps (its warm-up is a fraction of training) and ensemble KD needs both teachers, so
both use :func:`run_distillation`: named frozen teachers in ``frozen[name]``, the student trained and
reported by the same :func:`kd.supervised.train_network` as every other baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kd.config import ModelConfig, RunConfig
from kd.data import steps_per_epoch
from kd.modeling import Net, build_net
from kd.step import apply_model
from kd.supervised import Extras, prepare, resolve_resume, train_network

from ._distill import ensure_teacher, load_teacher

# teachers(cfg) -> {"teacher1": (model, checkpoint), ...}: the names are the keys of ``frozen``.
TeacherSpecs = Callable[[RunConfig], dict[str, tuple[ModelConfig, str]]]


@dataclass(frozen=True)
class TwoTeacherConfig(RunConfig):
    """A student distilled from IB-KD's two fine-tuned teachers by a fixed rule (no learned fusion)."""

    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """The student network."""
    teacher1: ModelConfig = ModelConfig(arch="resnet152", pretrained=True)
    """First teacher (weights from --teacher1-ckpt)."""
    teacher1_ckpt: str = "checkpoints/resnet152_ft.safetensors"
    """First teacher's fine-tuned weights; fine-tuned first when missing."""
    teacher2: ModelConfig = ModelConfig(arch="efficientnet_b2", pretrained=True)
    """Second teacher (weights from --teacher2-ckpt)."""
    teacher2_ckpt: str = "checkpoints/efficientnet_b2_ft.safetensors"
    """Second teacher's fine-tuned weights; fine-tuned first when missing."""
    teacher_epochs: int = 30
    """Fine-tuning epochs for a teacher whose checkpoint is missing."""
    label_smoothing: float = 0.0
    """Label smoothing of the student's cross-entropy."""
    grad_clip_norm: float = 0.0
    """Global gradient-norm clipping threshold (0 = off)."""
    ema: bool = True
    """Keep an EMA of the student (and its BN statistics), reported beside the raw weights."""


def two_teachers(cfg: TwoTeacherConfig) -> dict[str, tuple[ModelConfig, str]]:
    return {"teacher1": (cfg.teacher1, cfg.teacher1_ckpt), "teacher2": (cfg.teacher2, cfg.teacher2_ckpt)}


def frozen_teacher_logits(teachers: dict[str, Net], frozen: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """Every frozen teacher's logits (eval mode, no gradient), in the order of ``teachers``."""
    with torch.no_grad():
        return [apply_model(net.eval_skeleton, frozen[name]["params"], frozen[name]["buffers"], x, train=False)[0]
                for name, net in teachers.items()]


def run_distillation(cfg: RunConfig, recipe: str, teachers: TeacherSpecs, make_loss) -> dict:
    """Fine-tune missing teachers, load them frozen, train the student with
    ``make_loss(cfg, student, teachers: dict[str, Net], device, total_steps) -> (loss_fn, head_params,
    head_buffers)``. The summary's ``method`` is ``recipe``."""
    cfg = resolve_resume(cfg)
    specs = teachers(cfg)
    for model, ckpt in specs.values():
        ensure_teacher(cfg, model, ckpt, cfg.teacher_epochs)
    cfg, device, splits, run_dir = prepare(cfg, recipe)
    nets = {name: load_teacher(model, ckpt, splits.num_classes, device, channels_last=cfg.channels_last)
            for name, (model, ckpt) in specs.items()}
    student = build_net(cfg.student, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed)
    total_steps = steps_per_epoch(splits, cfg.data) * cfg.epochs
    loss_fn, head_params, head_buffers = make_loss(cfg, student, nets, device, total_steps)
    extras = Extras(params=head_params, buffers=head_buffers,
                    frozen={name: {"params": net.params, "buffers": net.buffers} for name, net in nets.items()},
                    summary={"method": recipe, "teachers": [model.arch for model, _ in specs.values()]})
    return train_network(cfg, recipe, run_dir, splits, device, student, cfg.student, part="student", loss_fn=loss_fn,
                         grad_clip_norm=cfg.grad_clip_norm, ema=cfg.ema, extras=extras)
