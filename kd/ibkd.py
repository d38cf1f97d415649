"""ASMB IB-KD, the method (SPEC 6): its configuration and the two stages' losses.

Stage A trains the MBM on frozen teachers' pooled features: ``CE(s, y) + beta * KL``, the MBM sampling
``z = mu + eps * std`` through the fused reparameterisation + KL kernel.

Stage B trains the student (and its projection head, and optional feature adapters) from the MBM in
eval mode (``z = mu``, deterministic targets) on the same mixed input:
``ce_alpha*CE + alpha_kd*KD + lambda_lat*latent + gamma*feat``; the latent, KD and CE terms come from
one fused kernel (:func:`kernels.ib_student_loss`), every schedule is a function of the step counter.

How the stages are run (feature cache, loops, resume) is in :mod:`kd.ibkd_run`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

import kernels
from kernels import reference as kernel_reference

from .errors import ConfigError
from .losses import clip_threshold, feature_alignment, kd_ramp, latent_weight, lerp, progress
from .mbm import MBM, MBMConfig
from .modeling import Net
from .step import apply_model, call_stateless
from .teacher_outputs import frozen_teacher
from .teachers import TwoTeachersConfig


@dataclass(frozen=True)
class StageAConfig:
    """Stage A: the MBM trained on frozen teachers' cached features."""

    epochs: int = 20
    """MBM epochs per stage."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 5e-4
    """Adam (L2) weight decay."""
    grad_clip_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    beta: float = 1e-3
    """Weight of the KL term."""
    cache_views: int = 1
    """Teacher-feature views cached per training image: view 0 is the un-augmented image, the others
    are seeded random crops+flips. One view = one teacher forward per image for all of stage A."""
    batch_size: int = 256
    """MBM batch size."""


@dataclass(frozen=True)
class StageBConfig:
    """Stage B: the student distilled from the synergy logits and the bottleneck latent."""

    ce_alpha: float = 0.5
    """Weight of the (label-smoothed, mixed-target) cross-entropy (SPEC: 1.0)."""
    kd_alpha_init: float = 0.5
    """KD weight at the start of the ramp (SPEC: 0.3)."""
    kd_alpha_final: float = 0.5
    """KD weight at the end of the ramp (SPEC: 0.6)."""
    kd_temperature_init: float = 4.0
    """KD temperature at the start of the ramp (SPEC: 6.0)."""
    kd_temperature_final: float = 4.0
    """KD temperature at the end of the ramp (SPEC: 2.5)."""
    kd_warmup_frac: float = 0.03
    """Fraction of training before the KD ramp starts."""
    kd_pow: float = 1.0
    """Shape of the ramp p = (max(0, r - w) / (1 - w)) ** pow."""
    latent_alpha: float = 1.0
    """Final weight of the latent term; 0 while progress r < latent_start, then a linear ramp (SPEC: 0.8)."""
    latent_start: float = 0.3
    """Progress at which the latent term starts."""
    latent_norm: Literal["dim", "sqrt", "none"] = "sqrt"
    """Scale of the latent term: 1/z_dim, 1/sqrt(z_dim) or 1 (SPEC: dim)."""
    label_smoothing: float = 0.05
    """Label smoothing of the cross-entropy."""
    gamma: float = 0.0
    """Weight of the optional feature term (learned 1x1 adapters, per-channel L2-normalised MSE)."""
    feature_stage: str = "stage4"
    """Student and teacher stage matched by the feature term."""
    synergy_scale: Literal["none", "teachers"] = "teachers"
    """'teachers': after stage A the synergy logits are divided by one constant, fitted without labels on
    the training images, so that their mean per-sample standard deviation equals that of the teachers'
    average logits: the MBM keeps its ranking of the classes but gets the teachers' softness. 'none': the
    MBM's logits as they are (SPEC: none)."""


@dataclass(frozen=True)
class IBKDConfig(TwoTeachersConfig):
    """Multi-teacher IB-KD (SPEC 6)."""

    mbm: MBMConfig = field(default_factory=MBMConfig)
    """The bottleneck module."""
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    """Stage A (MBM on frozen teachers)."""
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    """Stage B (student) loss weights and schedules."""
    num_stages: int = 1
    """Alternations of stage A then stage B; the student epochs are split across stages."""
    grad_clip_norm_init: float = 0.0
    """Stage B gradient-norm clipping threshold while progress < grad_clip_warmup_frac (0 = off; SPEC: 1.0)."""
    grad_clip_norm_final: float = 0.0
    """Threshold reached linearly at the end (0 = clipping switched off, never clipping to zero)."""
    grad_clip_warmup_frac: float = 0.5
    """Progress fraction before the threshold starts moving."""
    ema: bool = True
    """EMA of the student (and its BN statistics), updated every step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_stages < 1 or self.num_stages > self.epochs:
            raise ConfigError(f"num_stages must be in [1, epochs], got {self.num_stages}")
        if self.stage_a.cache_views < 1:
            raise ConfigError(f"stage_a.cache_views must be >= 1, got {self.stage_a.cache_views}")


def teacher_average(teacher_logits) -> torch.Tensor:
    """The two teachers' mean logits (float32): the fixed-rule fusion the MBM is compared with."""
    return (teacher_logits[0].float() + teacher_logits[1].float()) / 2


def logit_spread(logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample standard deviation of the logits (how sharp they are)."""
    return logits.float().std(dim=1).mean()


def synergy_scale_factor(synergy_logits: torch.Tensor, teacher_logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The constant that gives the synergy logits the spread of the teachers' average logits (no labels)."""
    return logit_spread(synergy_logits) / logit_spread(teacher_average(teacher_logits)).clamp_min(1e-12)


def latent_scale(norm: str, z_dim: int) -> float:
    return {"dim": 1.0 / z_dim, "sqrt": 1.0 / math.sqrt(z_dim), "none": 1.0}[norm]


# ----------------------------------------------------------------------------------------------
# Stage A


def stage_a_loss(mbm_train: MBM, beta: float):
    """``CE(s, y) + beta * mean_batch KL``; a batch holds cached features ``f1``, ``f2`` and labels."""

    def loss_fn(params, buffers, frozen, batch, step):
        eps = torch.randn((batch["f1"].shape[0], mbm_train.mu.out_features), device=batch["f1"].device)
        out, _ = call_stateless(mbm_train, params["mbm"], {}, batch["f1"], batch["f2"], eps, train=True)
        ce = F.cross_entropy(out["logits"].float(), batch["y_a"])
        kl = out["kl"].mean()
        return ce + beta * kl, (buffers, {"ce": ce.detach(), "kl": kl.detach()})

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Stage B


@dataclass
class StageBParts:
    """Skeletons stage B calls: the student, its projection head, the frozen teachers and MBM, adapters."""

    student: Net
    projection_train: torch.nn.Module | None  # None (like mbm_eval) for the plain-average ablation
    teachers: tuple[Net, Net]
    mbm_eval: MBM | None
    adapters: tuple[torch.nn.Module, torch.nn.Module] | None
    z_dim: int


def stage_b_loss(parts: StageBParts, cfg: StageBConfig, total_steps: int, backend: str | None = None):
    """The student's loss. ``backend`` picks the kernels (None = ``$KD_KERNELS`` / auto)."""
    scale = latent_scale(cfg.latent_norm, parts.z_dim)
    reads_maps = cfg.gamma > 0 and parts.adapters is not None  # the feature term: teachers' maps, never shared

    def loss_fn(params, buffers, frozen, batch, step):
        r = progress(step, total_steps)
        ramp = kd_ramp(r, cfg.kd_warmup_frac, cfg.kd_pow)
        alpha_kd = lerp(cfg.kd_alpha_init, cfg.kd_alpha_final, ramp)
        temperature = lerp(cfg.kd_temperature_init, cfg.kd_temperature_final, ramp)
        lambda_latent = latent_weight(r, cfg.latent_alpha, cfg.latent_start)
        x = batch["x"]

        with torch.no_grad():  # targets: frozen teachers, MBM in eval mode (z = mu)
            teacher_logits, teacher_pooled, teacher_maps = [], [], []
            for name, teacher in zip(("teacher1", "teacher2"), parts.teachers):
                logits_t, feats = frozen_teacher(name, teacher, frozen, batch, maps=reads_maps)
                teacher_logits.append(logits_t)
                teacher_pooled.append(feats["pooled"])
                teacher_maps.append(feats.get(cfg.feature_stage))
            if parts.mbm_eval is None:  # ablation (mbm.kind "avg"): the plain average of the teachers
                synergy = {"logits": teacher_average(teacher_logits)}
            else:
                synergy, _ = call_stateless(parts.mbm_eval, frozen["mbm"], {}, *teacher_pooled, train=False)
                if "synergy_scale" in frozen:  # stage_b.synergy_scale "teachers"
                    synergy = {**synergy, "logits": synergy["logits"].float() / frozen["synergy_scale"]}

        logits, feats, student_buffers = apply_model(parts.student.train_skeleton, params["student"],
                                                     buffers["student"], x, train=True)
        new_buffers = {**buffers, "student": student_buffers}
        if parts.mbm_eval is None:  # no bottleneck: no latent term
            kd = kernel_reference.distillation_kl(
                logits, F.log_softmax(synergy["logits"].float() / temperature, dim=1), temperature)
            ce = kernel_reference.mixed_cross_entropy(logits, batch["y_a"], batch["y_b"], batch["lam"],
                                                       cfg.label_smoothing)
            latent = torch.zeros_like(ce)
        else:
            z_student, new_buffers["projection"] = call_stateless(
                parts.projection_train, params["projection"], buffers["projection"], feats["pooled"], train=True)
            mu, logvar = synergy["mu"].float(), synergy["logvar"].float()
            mse, ang, kd, ce = kernels.ib_student_loss(
                z_student, mu, logvar, kernels.precision_clamp_value(logvar), logits, synergy["logits"].float(),
                batch["y_a"], batch["y_b"], batch["lam"], temperature, label_smoothing=cfg.label_smoothing,
                backend=backend)
            latent = (0.7 * mse + 0.3 * ang) * scale
        loss = cfg.ce_alpha * ce + alpha_kd * kd + lambda_latent * latent
        metrics = {"ce": ce.detach(), "kd": kd.detach(), "latent": latent.detach(), "alpha_kd": alpha_kd,
                   "temperature": temperature, "lambda_latent": lambda_latent}
        if cfg.gamma > 0 and parts.adapters is not None:
            feat = sum(
                feature_alignment(call_stateless(adapter, params["adapters"][name], {}, feats[cfg.feature_stage],
                                                 train=True)[0], teacher_map)
                for name, adapter, teacher_map in zip(("teacher1", "teacher2"), parts.adapters, teacher_maps))
            loss = loss + cfg.gamma * feat
            metrics["feat"] = feat.detach()
        return loss, (new_buffers, metrics)

    return loss_fn


def stage_b_clip(init: float, final: float, warmup_frac: float, total_steps: int):
    return lambda step: clip_threshold(progress(step, total_steps), init, final, warmup_frac)
