"""What every method of :mod:`kd.methods` shares: the :class:`Method` value, the distillation configs, the
student pipeline of IB-KD's stage B that every baseline uses, and the frozen teachers' forward."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..config import ModelConfig
from ..data import DataConfig
from ..errors import ConfigError
from ..modeling import Net
from ..optim import OptimConfig
from ..step import AmpConfig, apply_model, frozen_teacher
from ..teachers import SPEC_TEACHERS, FrozenTeachersConfig, TeacherSpec

# make_loss(cfg, student, teachers, device, total_steps) -> Loss: the one signature of every method.
MakeLoss = Callable[[Any, Net, dict[str, Net], torch.device, int], "Loss"]


@dataclass
class Loss:
    """What a method's ``make_loss`` builds once before training."""

    fn: Callable
    """``fn(params, buffers, frozen, batch, step) -> (loss, (new_buffers, metrics))``: what the pure train step
    differentiates (with respect to ``params``)."""
    params: dict = field(default_factory=dict)
    """Trainable heads beside the network (a FitNet regressor, IB-KD's projection head), by state key."""
    buffers: dict = field(default_factory=dict)
    """Their buffers (BatchNorm statistics), by the same keys."""
    frozen: dict = field(default_factory=dict)
    """Constant inputs of the loss beside the frozen teachers (IB-KD: the MBM, replaced by each stage A)."""
    clip: Callable[[torch.Tensor], torch.Tensor] | None = None
    """``step -> gradient-norm clipping threshold`` (None: the constant ``cfg.grad_clip_norm``)."""
    stages: "Stages | None" = None
    """Work before each stage of student epochs (IB-KD's stage A); None: one stage, nothing before it."""


class Stages(Protocol):
    """The hook of a method whose student epochs are split in stages with work before each (IB-KD)."""

    count: int
    """Stages; the student's epochs are split across them (:func:`kd.train.stage_boundaries`)."""

    def start(self, run: Any, splits: Any) -> dict[str, Any]:
        """Once, before any stage (IB-KD: the teachers' feature caches); summary fields."""

    def before(self, stage: int, state: dict, *, done: bool) -> tuple[dict, dict[str, Any]]:
        """Before stage ``stage``'s student epochs: the new train state (IB-KD: its trained MBM in
        ``state["frozen"]``) and summary fields. ``done``: a resumed run has already trained student epochs
        after this point, so its result is inside ``state`` and only its numbers are read back."""


# How many teachers a method takes from ``cfg.teachers``: (at least, at most; None = any number).
NO_TEACHERS, ONE_TEACHER, TWO_TEACHERS, TWO_OR_MORE = (0, 0), (1, 1), (2, 2), (2, None)


@dataclass(frozen=True)
class Method:
    """One distillation method: what :func:`kd.train.distill` needs to run it."""

    name: str
    """The registry name (recipes.compare's --methods, the summary's method)."""
    make_loss: MakeLoss
    """The loss, with its trainable heads (a FitNet regressor), built once before training."""
    teachers: tuple[int, int | None] = NO_TEACHERS
    """How many frozen teachers of ``cfg.teachers`` it takes: (at least, at most; None = any number)."""
    maps: bool | Callable[[Any], bool] = False
    """The loss reads the teachers' feature maps (or ``cfg -> whether it does``), so shared teacher outputs
    (logits and pooled features only, see kd.teacher_outputs) cannot replace their forward."""
    part: str = "student"
    """The trained network: its config field (``cfg.student``) and its key in the train state and checkpoints."""

    def reads_maps(self, cfg: Any) -> bool:
        return self.maps(cfg) if callable(self.maps) else self.maps

    def teacher_specs(self, cfg: Any) -> dict[str, TeacherSpec]:
        """``{name: spec}`` of the frozen teachers, under the names the loss reads them by (``frozen[name]``):
        ``teacher`` for a one-teacher method, ``teacher1``, ``teacher2``, ... otherwise. A count outside the
        method's is one :class:`ConfigError`."""
        specs = tuple(getattr(cfg, "teachers", ()))
        low, high = self.teachers
        if len(specs) < low or (high is not None and len(specs) > high):
            wanted = f"{low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"recipes.{self.name} distils from {wanted} teacher{'s' * (wanted != '1')}, "
                              f"--teachers lists {len(specs)}")
        if high == 1:
            return {"teacher": specs[0]}
        return {f"teacher{i + 1}": spec for i, spec in enumerate(specs)}


@dataclass(frozen=True)
class DistillConfig(FrozenTeachersConfig):
    """A student distilled from fine-tuned teachers by a fixed rule (one teacher by default; the multi-teacher
    methods' recipes default to SPEC's two)."""

    teachers: tuple[TeacherSpec, ...] = SPEC_TEACHERS[:1]
    """The frozen teachers in order: --teachers.0.arch / --teachers.0.ckpt, ... (the weights come from ckpt;
    pretrained only matters for fine-tuning a missing one)."""
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
        student=ModelConfig(arch="resnet8x4"),
        teachers=(TeacherSpec(arch="resnet32x4", pretrained=False, ckpt="checkpoints/resnet32x4_ft.safetensors"),),
        label_smoothing=0.0, amp=AmpConfig())


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


def frozen_teacher_logits(teachers: dict[str, Net], frozen: dict, batch: dict) -> list[torch.Tensor]:
    """Every frozen teacher's logits on ``batch["x"]`` (eval mode, no gradient; read from the batch when
    shared, see :mod:`kd.teacher_outputs`), in the order of ``teachers``."""
    return [frozen_teacher(name, net, frozen, batch)[0] for name, net in teachers.items()]
