"""Hinton KD baseline: (1-a)*CE + a*T^2*KL(teacher || student) from one fine-tuned teacher (T 4, a 0.9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kd.losses import hinton_kd
from kd.modeling import build_net
from kd.step import apply_model, mixed_cross_entropy
from kd.supervised import Extras, prepare, resolve_resume, train_network

from ._cli import parse
from ._distill import STUDENT_DATA, STUDENT_OPTIM, DistillConfig, ensure_teacher, load_teacher


@dataclass(frozen=True)
class KDConfig(DistillConfig):
    """Hinton knowledge distillation."""

    temperature: float = 4.0
    """Softmax temperature T of the KL term (scaled by T^2)."""
    alpha: float = 0.9
    """Weight a of the KL term; the cross-entropy gets 1 - a."""


CONFIG = KDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def hinton_loss(student, teacher, cfg: KDConfig):
    def loss_fn(params, buffers, frozen, batch, step):
        with torch.no_grad():
            teacher_logits, _, _ = apply_model(teacher.eval_skeleton, frozen["teacher"]["params"],
                                               frozen["teacher"]["buffers"], batch["x"], train=False)
        logits, _, new_buffers = apply_model(student.train_skeleton, params["student"], buffers["student"],
                                             batch["x"], train=True)
        ce = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
        kd = hinton_kd(logits, teacher_logits, cfg.temperature)
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        return loss, ({**buffers, "student": new_buffers}, {"ce": ce.detach(), "kd": kd.detach()})
    return loss_fn


def run(cfg: KDConfig, recipe: str = "kd") -> dict:
    cfg = resolve_resume(cfg)
    ensure_teacher(cfg, cfg.teacher, cfg.teacher_ckpt, cfg.teacher_epochs)
    cfg, device, splits, run_dir = prepare(cfg, recipe)
    teacher = load_teacher(cfg.teacher, cfg.teacher_ckpt, splits.num_classes, device, channels_last=cfg.channels_last)
    student = build_net(cfg.student, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed)
    extras = Extras(frozen={"teacher": {"params": teacher.params, "buffers": teacher.buffers}},
                    summary={"method": recipe, "teachers": [cfg.teacher.arch]})
    return train_network(cfg, recipe, run_dir, splits, device, student, cfg.student, part="student",
                         loss_fn=hinton_loss(student, teacher, cfg), grad_clip_norm=cfg.grad_clip_norm,
                         ema=cfg.ema, extras=extras)


def main(argv=None, prog="launch.py recipes.kd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
