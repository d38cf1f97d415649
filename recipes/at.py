"""Attention Transfer baseline (Zagoruyko & Komodakis, p=2): CE + beta * sum over stage pairs of L_AT."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from kd.errors import ConfigError
from kd.modeling import build_net
from kd.step import apply_model, mixed_cross_entropy
from kd.supervised import Extras, prepare, resolve_resume, train_network

from ._cli import parse
from ._distill import STUDENT_DATA, STUDENT_OPTIM, DistillConfig, ensure_teacher, load_teacher

STAGES = ("stage1", "stage2", "stage3", "stage4")


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
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {self.stages}")


CONFIG = ATConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def attention_loss(student, teacher, cfg: ATConfig):
    def loss_fn(params, buffers, frozen, batch, step):
        with torch.no_grad():
            _, teacher_features, _ = apply_model(teacher.eval_skeleton, frozen["teacher"]["params"],
                                                 frozen["teacher"]["buffers"], batch["x"], train=False)
        logits, features, new_buffers = apply_model(student.train_skeleton, params["student"], buffers["student"],
                                                    batch["x"], train=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        at = kernels.attention_transfer_loss([features[s] for s in cfg.stages],
                                             [teacher_features[s] for s in cfg.stages])
        loss = ce + cfg.beta * at
        return loss, ({**buffers, "student": new_buffers}, {"ce": ce.detach(), "at": at.detach()})
    return loss_fn


def run(cfg: ATConfig, recipe: str = "at") -> dict:
    cfg = resolve_resume(cfg)
    ensure_teacher(cfg, cfg.teacher, cfg.teacher_ckpt, cfg.teacher_epochs)
    cfg, device, splits, run_dir = prepare(cfg, recipe)
    teacher = load_teacher(cfg.teacher, cfg.teacher_ckpt, splits.num_classes, device, channels_last=cfg.channels_last)
    student = build_net(cfg.student, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed)
    from kd.models import feature_shapes
    for arch, net in ((cfg.student.arch, student), (cfg.teacher.arch, teacher)):
        shapes = feature_shapes(net.eval_skeleton)
        if any(s not in shapes for s in cfg.stages):
            raise ConfigError(f"{arch} does not expose feature maps {cfg.stages} (it has {sorted(shapes)})")
    extras = Extras(frozen={"teacher": {"params": teacher.params, "buffers": teacher.buffers}},
                    summary={"method": recipe, "teachers": [cfg.teacher.arch]})
    return train_network(cfg, recipe, run_dir, splits, device, student, cfg.student, part="student",
                         loss_fn=attention_loss(student, teacher, cfg), grad_clip_norm=cfg.grad_clip_norm,
                         ema=cfg.ema, extras=extras)


def main(argv=None, prog="launch.py recipes.at"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
