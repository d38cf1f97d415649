"""Fine-tune a teacher with cross-entropy (SPEC 5) and write its best-by-validation weights to --ckpt."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kd.checkpoint import load_checkpoint, save_checkpoint
from kd.config import ModelConfig, RunConfig, to_dict
from kd.data import DataConfig
from kd.optim import OptimConfig
from kd.run import say
from kd.supervised import resolve_resume, train_classifier

from ._cli import parse


@dataclass(frozen=True)
class TeacherConfig(RunConfig):
    """Teacher fine-tuning: AdamW, warm-up + cosine, RandAugment, mixup, label smoothing, clipping."""

    teacher: ModelConfig = ModelConfig(arch="resnet152", pretrained=True)
    """The teacher network."""
    ckpt: str = "checkpoints/resnet152_ft.safetensors"
    """Where the best-by-validation teacher weights are written (safetensors)."""
    overwrite: bool = False
    """Remove an existing --ckpt and train again; without it an existing checkpoint is reused."""
    label_smoothing: float = 0.05
    """Label smoothing of the cross-entropy."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clipping threshold (0 = off)."""
    ema: bool = False
    """Also keep an EMA of the weights (reported, not written to --ckpt)."""


CONFIG = TeacherConfig(
    data=DataConfig(name="cifar100", batch_size=128, randaugment_n=2, randaugment_m=7, mixup_alpha=0.2),
    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=3e-4, warmup_epochs=5, min_lr_ratio=0.1),
    epochs=30,
)


def run(cfg: TeacherConfig) -> dict:
    cfg = resolve_resume(cfg)
    ckpt = Path(cfg.ckpt)
    if ckpt.exists() and not cfg.resume:
        if not cfg.overwrite:
            meta = load_checkpoint(ckpt)[1]  # fails clearly if the file is unusable
            say(f"teacher checkpoint {ckpt} exists (arch {meta.get('arch')}, val acc {meta.get('val_acc', '?')}): "
                f"reusing it, training skipped (pass --overwrite True to retrain)")
            return {"skipped": True, "ckpt": str(ckpt)}
        say(f"--overwrite True: removing {ckpt}")
        ckpt.unlink()
    run_dir, summary = train_classifier(cfg, "teacher", cfg.teacher, part="teacher",
                                        label_smoothing=cfg.label_smoothing, grad_clip_norm=cfg.grad_clip_norm,
                                        ema=cfg.ema)
    tree, meta = load_checkpoint(run_dir.path("best.safetensors"))
    meta = {k: v for k, v in meta.items() if k not in ("format", "code_version")}
    meta.update({"config": to_dict(cfg), "val_acc": summary["best_val_acc"], "test_acc": summary["best_test_acc"]})
    save_checkpoint(ckpt, tree, meta)
    say(f"teacher weights (best by validation: val {summary['best_val_acc']:.2f}%, test "
        f"{summary['best_test_acc']:.2f}%) written to {ckpt}")
    return summary


def main(argv=None, prog="launch.py recipes.teacher"):
    cfg = parse(CONFIG, argv, prog=prog, description=__doc__)
    run(cfg)
    return 0
