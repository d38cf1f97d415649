"""Shared pieces of the distillation recipes: teacher checkpoints and the single-teacher baselines' config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from kd.config import ModelConfig, RunConfig
from kd.data import DataConfig, steps_per_epoch
from kd.modeling import Net, build_net
from kd.optim import OptimConfig
from kd.step import AmpConfig, apply_model
from kd.supervised import Extras, prepare, resolve_resume, train_network
from kd.teacher_outputs import frozen_teacher, teacher_outputs_for
from kd.teachers import TEACHER_HASHES, check_same_teachers, teacher_hashes
from kd.teachers import ensure_teacher, load_teacher  # noqa: F401  (re-exported for the recipes)


@dataclass(frozen=True)
class DistillConfig(RunConfig):
    """A student distilled from one fine-tuned teacher."""

    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """The student network."""
    teacher: ModelConfig = ModelConfig(arch="resnet152", pretrained=True)
    """The teacher network (its weights come from --teacher-ckpt)."""
    teacher_ckpt: str = "checkpoints/resnet152_ft.safetensors"
    """Fine-tuned teacher weights (recipes.teacher output); fine-tuned first when missing."""
    teacher_epochs: int = 30
    """Fine-tuning epochs when the teacher checkpoint is missing."""
    fold_teacher_bn: bool = True
    """Fold the frozen teacher's BatchNorm into the convolutions before them (the same function up to float
    rounding, fewer passes per forward)."""
    teacher_cache: str = ""
    """Directory where the frozen teachers' logits and pooled features are kept per training batch, so that
    runs on the same data, seed and teachers (the methods of one comparison) compute them once and read them
    afterwards ('' = every run computes them in its step). Methods that read feature maps (at, fitnet, ibkd
    with the feature term) compute them in the step regardless."""
    teacher_cache_max_gb: float = 10.0
    """--teacher-cache stores nothing (and says so) when a run's outputs would exceed this many GB."""
    label_smoothing: float = 0.0
    """Label smoothing of the student's cross-entropy."""
    grad_clip_norm: float = 0.0
    """Global gradient-norm clipping threshold (0 = off)."""
    ema: bool = True
    """Keep an EMA of the student (and its BN statistics), reported beside the raw weights."""


# The student pipeline of IB-KD stage B, shared by every baseline so comparisons are like for like.
STUDENT_DATA = DataConfig(name="cifar100", batch_size=128, mixup_alpha=0.2, cutmix_alpha=0.5, cutmix_prob=0.5)
STUDENT_OPTIM = OptimConfig(name="adamw", lr=1e-3, weight_decay=5e-4, warmup_epochs=5, min_lr_ratio=0.05)

# The peer CIFAR-100 tables (CRD / mdistiller): SGD 0.05, batch 64, 240 epochs, /10 at 150/180/210, crop+flip.
CIFAR_TABLE_DATA = DataConfig(name="cifar100", batch_size=64)
CIFAR_TABLE_OPTIM = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="multistep",
                                milestones=(150, 180, 210), gamma=0.1, warmup_epochs=0)


def cifar_table(cfg: DistillConfig, *, lr: float = 0.05) -> DistillConfig:
    """The peer-table variant of a baseline: resnet32x4 -> resnet8x4 with the table's optimizer and data."""
    return dataclasses.replace(
        cfg, data=CIFAR_TABLE_DATA, optim=dataclasses.replace(CIFAR_TABLE_OPTIM, lr=lr), epochs=240,
        student=ModelConfig(arch="resnet8x4"), teacher=ModelConfig(arch="resnet32x4", pretrained=False),
        teacher_ckpt="checkpoints/resnet32x4_ft.safetensors", label_smoothing=0.0, amp=AmpConfig())


def forward_pair(student: Net, teacher: Net, params: dict, buffers: dict, frozen: dict, batch: dict, *,
                 maps: bool = False):
    """The frozen teacher (eval mode, no gradient; read from the batch when shared, see
    :mod:`kd.teacher_outputs`) and the student (training mode) on ``batch["x"]``: ``(teacher_logits,
    teacher_features, logits, features, new_buffers)``. ``maps``: the loss reads the teacher's feature maps."""
    x = batch["x"]
    teacher_logits, teacher_features = frozen_teacher("teacher", teacher, frozen, batch, maps=maps)
    logits, features, student_buffers = apply_model(student.train_skeleton, params["student"], buffers["student"], x,
                                                    train=True)
    return teacher_logits, teacher_features, logits, features, {**buffers, "student": student_buffers}


def run_single_teacher(cfg: DistillConfig, recipe: str, make_loss, *, maps: bool = False) -> dict:
    """Shared driver of the single-teacher baselines: :func:`run_distillation` with the one teacher
    ``frozen["teacher"]``. ``make_loss(cfg, student, teacher, device)`` returns ``(loss_fn, head_params,
    head_buffers)`` (heads such as FitNet's regressor are trained and saved with the student)."""
    return run_distillation(cfg, recipe, lambda c: {"teacher": (c.teacher, c.teacher_ckpt)},
                            lambda c, student, teachers, device, total_steps: make_loss(c, student, teachers["teacher"],
                                                                                        device), maps=maps)


# teachers(cfg) -> {"teacher1": (model, checkpoint), ...}: the names are the keys of ``frozen``.
TeacherSpecs = Callable[[RunConfig], dict[str, tuple[ModelConfig, str]]]


def run_distillation(cfg: RunConfig, recipe: str, teachers: TeacherSpecs, make_loss, *, maps: bool = False) -> dict:
    """The one driver of every distillation baseline: fine-tune missing teachers, load them frozen
    (``frozen[name]``), train the student with ``make_loss(cfg, student, teachers: dict[str, Net], device,
    total_steps) -> (loss_fn, head_params, head_buffers)`` through :func:`kd.supervised.train_network`.
    The summary's ``method`` is ``recipe``. ``maps``: the loss reads the teachers' feature maps, so their
    outputs are not shared through ``cfg.teacher_cache`` (only logits and pooled features are)."""
    cfg = resolve_resume(cfg)
    specs = teachers(cfg)
    for name, (model, ckpt) in specs.items():
        ensure_teacher(cfg, model, ckpt, cfg.teacher_epochs, f"--{name}")
    cfg, device, splits, run_dir = prepare(cfg, recipe)
    nets = {name: load_teacher(model, ckpt, splits.num_classes, device, channels_last=cfg.channels_last,
                               fold_bn=cfg.fold_teacher_bn, dataset=splits.name) for name, (model, ckpt) in specs.items()}
    ckpts = {name: ckpt for name, (_, ckpt) in specs.items()}
    hashes = teacher_hashes(ckpts)
    if cfg.resume and (run_dir.root / "last.safetensors").exists():  # .root: reading it changes nothing
        check_same_teachers(run_dir.root / "last.safetensors", ckpts, hashes)
    student = build_net(cfg.student, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed, flag="--student")
    total_steps = steps_per_epoch(splits, cfg.data) * cfg.epochs
    loss_fn, head_params, head_buffers = make_loss(cfg, student, nets, device, total_steps)
    shared = teacher_outputs_for(cfg, {name: (net, specs[name][1]) for name, net in nets.items()}, splits, device,
                                 method=recipe, maps=maps)
    extras = Extras(params=head_params, buffers=head_buffers,
                    frozen={name: {"params": net.params, "buffers": net.buffers} for name, net in nets.items()},
                    summary={"method": recipe, "teachers": [model.arch for model, _ in specs.values()]},
                    teacher_outputs=shared, meta={TEACHER_HASHES: hashes})
    return train_network(cfg, recipe, run_dir, splits, device, student, cfg.student, part="student", loss_fn=loss_fn,
                         grad_clip_norm=cfg.grad_clip_norm, ema=cfg.ema, extras=extras)
