"""CE baseline: the student trained alone with label smoothing, same data and schedule as IB-KD stage B."""

from __future__ import annotations

from dataclasses import dataclass

from kd.config import ModelConfig, RunConfig
from kd.data import DataConfig
from kd.optim import OptimConfig
from kd.supervised import resolve_resume, train_classifier

from ._cli import parse


@dataclass(frozen=True)
class CEConfig(RunConfig):
    """Student-only training with cross-entropy."""

    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """The student network."""
    label_smoothing: float = 0.05
    """Label smoothing of the cross-entropy."""
    grad_clip_norm: float = 0.0
    """Global gradient-norm clipping threshold (0 = off)."""
    ema: bool = True
    """Keep an EMA of the student (and its BN statistics), reported beside the raw weights."""


CONFIG = CEConfig(
    data=DataConfig(name="cifar100", batch_size=128, mixup_alpha=0.2, cutmix_alpha=0.5, cutmix_prob=0.5),
    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=5e-4, warmup_epochs=5, min_lr_ratio=0.05),
    epochs=90,
)


def run(cfg: CEConfig, recipe: str = "ce") -> dict:
    cfg = resolve_resume(cfg)
    return train_classifier(cfg, recipe, cfg.student, part="student", label_smoothing=cfg.label_smoothing,
                            grad_clip_norm=cfg.grad_clip_norm, ema=cfg.ema)[1]


def main(argv=None, prog="launch.py recipes.ce"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
