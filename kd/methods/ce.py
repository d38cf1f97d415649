"""CE: the student trained alone with label-smoothed cross-entropy on the (mixed) targets."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, RunConfig
from ..step import apply_model, mixed_cross_entropy
from .base import Loss, Method


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


def classifier(part: str):
    """The CE loss of the network trained under state key ``part`` (the student, or a teacher being fine-tuned)."""
    def make_loss(cfg, net, teachers, device, total_steps):
        def loss_fn(params, buffers, frozen, batch, step):
            logits, _, new_buffers = apply_model(net.train_skeleton, params[part], buffers[part], batch["x"], train=True)
            loss = mixed_cross_entropy(logits, batch, cfg.label_smoothing)
            return loss, ({**buffers, part: new_buffers}, {"ce": loss.detach()})
        return Loss(loss_fn)
    return make_loss


METHOD = Method("ce", classifier("student"))
# Teacher fine-tuning (SPEC 5, kd.teachers.fine_tune) is this method on the teacher network (cfg.teacher).
FINE_TUNING = Method("teacher", classifier("teacher"), part="teacher")
