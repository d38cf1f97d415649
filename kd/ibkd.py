"""ASMB IB-KD: the two stages of SPEC 6 as pure loss functions, plus the stage-A feature cache.

Stage A trains the MBM on frozen teachers' pooled features: ``CE(s, y) + beta * KL``. The teachers are
frozen, so their features are computed once per cached view and stage A never runs a teacher forward.

Stage B trains the student (and its projection head, and optional feature adapters) from the MBM in
eval mode (``z = mu``, deterministic targets) on the same mixed input:
``ce_alpha*CE + alpha_kd*KD + lambda_lat*latent + gamma*feat``, with every schedule a function of the
step counter inside the compiled step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels

from . import tree as T
from .data import DataConfig, Dataset, Splits, crop_flip, eval_batches
from .losses import clip_threshold, feature_alignment, kd_ramp, latent_weight, lerp, progress
from .mbm import MBM
from .modeling import Net
from .step import apply_model, call_stateless, mixed_cross_entropy


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

    ce_alpha: float = 1.0
    """Weight of the (label-smoothed, mixed-target) cross-entropy."""
    kd_alpha_init: float = 0.3
    """KD weight at the start of the ramp."""
    kd_alpha_final: float = 0.6
    """KD weight at the end."""
    kd_temperature_init: float = 6.0
    """KD temperature at the start of the ramp."""
    kd_temperature_final: float = 2.5
    """KD temperature at the end."""
    kd_warmup_frac: float = 0.03
    """Fraction of training before the KD ramp starts."""
    kd_pow: float = 1.0
    """Shape of the ramp p = (max(0, r - w) / (1 - w)) ** pow."""
    latent_alpha: float = 0.8
    """Final weight of the latent term; 0 while r < latent_start, then a linear ramp."""
    latent_start: float = 0.3
    """Progress at which the latent term starts."""
    latent_norm: Literal["dim", "sqrt", "none"] = "dim"
    """Scale of the latent term: 1/z_dim, 1/sqrt(z_dim) or 1."""
    label_smoothing: float = 0.05
    """Label smoothing of the cross-entropy."""
    gamma: float = 0.0
    """Weight of the optional feature term (learned 1x1 adapters, per-channel L2-normalised MSE)."""
    feature_stage: str = "stage4"
    """Student and teacher stage matched by the feature term."""


def latent_scale(norm: str, z_dim: int) -> float:
    return {"dim": 1.0 / z_dim, "sqrt": 1.0 / math.sqrt(z_dim), "none": 1.0}[norm]


# ----------------------------------------------------------------------------------------------
# Teacher features and the stage-A cache


def teacher_outputs(teachers: tuple[Net, Net], x: Tensor) -> tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]]]:
    """Both frozen teachers in eval mode: ``(logits, pooled, features)`` lists."""
    logits, pooled, features = [], [], []
    with torch.no_grad():
        for teacher in teachers:
            out, feats, _ = apply_model(teacher.eval_skeleton, teacher.params, teacher.buffers, x, train=False)
            logits.append(out)
            pooled.append(feats["pooled"])
            features.append(feats)
    return logits, pooled, features


def augmented_view(data: Dataset, view: int, seed: int) -> Dataset:
    """View 0 is the image itself; view v > 0 a seeded random crop (pad 4) + flip of every image."""
    if view == 0:
        return data
    generator = torch.Generator().manual_seed(seed * 100_003 + view)
    n = len(data.labels)
    top = torch.randint(0, 9, (n,), generator=generator)
    left = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return Dataset(crop_flip(data.images, top, left, flip), data.labels)


@dataclass
class FeatureCache:
    """Pooled teacher features stacked over views: ``teacher1[v, i]`` is image i's (C1,) feature in view v;
    logits per view for teacher accuracy."""

    teacher1: Tensor  # (V, N, C1)
    teacher2: Tensor  # (V, N, C2)
    logits: list[tuple[Tensor, Tensor]]
    labels: Tensor

    @property
    def pooled(self) -> list[tuple[Tensor, Tensor]]:
        """Per view, the two teachers' (N, C) features (views into the stacked tensors)."""
        return [(self.teacher1[v], self.teacher2[v]) for v in range(self.teacher1.shape[0])]


def build_cache(teachers: tuple[Net, Net], data: Dataset, splits: Splits, data_cfg: DataConfig, *, views: int,
                seed: int, device: torch.device, channels_last: bool = False) -> FeatureCache:
    pooled1, pooled2, logits = [], [], []
    for view in range(views):
        p1, p2, l1, l2 = [], [], [], []
        for batch in eval_batches(augmented_view(data, view, seed), splits, data_cfg, device=device):
            x = batch["x"].contiguous(memory_format=torch.channels_last) if channels_last else batch["x"]
            out_logits, out_pooled, _ = teacher_outputs(teachers, x)
            l1.append(out_logits[0].float()), l2.append(out_logits[1].float())
            p1.append(out_pooled[0].float()), p2.append(out_pooled[1].float())
        pooled1.append(torch.cat(p1))
        pooled2.append(torch.cat(p2))
        logits.append((torch.cat(l1), torch.cat(l2)))
    return FeatureCache(torch.stack(pooled1), torch.stack(pooled2), logits, data.labels.to(device))


def cached_batches(cache: FeatureCache, batch_size: int, *, seed: int, epoch: int):
    """Shuffled stage-A batches; each image's view is drawn per epoch (seeded)."""
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    n = len(cache.labels)
    order = torch.randperm(n, generator=generator)
    views = torch.randint(0, cache.teacher1.shape[0], (n,), generator=generator)
    device = cache.labels.device
    for start in range(0, n - batch_size + 1, batch_size):
        index = order[start:start + batch_size].to(device)
        view = views[start:start + batch_size].to(device)
        y = cache.labels[index]
        yield {"f1": cache.teacher1[view, index], "f2": cache.teacher2[view, index], "y_a": y, "y_b": y,
               "lam": torch.ones((), device=device)}


# ----------------------------------------------------------------------------------------------
# Losses


def stage_a_loss(mbm_train: MBM, beta: float):
    """``CE(s, y) + beta * mean_batch KL``, the MBM sampling ``z = mu + eps * std`` (fused kernel)."""

    def loss_fn(params, buffers, frozen, batch, step):
        mu_shape = (batch["f1"].shape[0], mbm_train.mu.out_features)
        eps = torch.randn(mu_shape, device=batch["f1"].device)
        out, _ = call_stateless(mbm_train, params["mbm"], {}, batch["f1"], batch["f2"], eps, train=True)
        ce = F.cross_entropy(out["logits"].float(), batch["y_a"])
        kl = out["kl"].mean()
        return ce + beta * kl, (buffers, {"ce": ce.detach(), "kl": kl.detach()})

    return loss_fn


def mbm_accuracy(mbm_eval: MBM, params: T.Tree, pooled: tuple[Tensor, Tensor], labels: Tensor) -> float:
    with torch.no_grad():
        out, _ = call_stateless(mbm_eval, params, {}, pooled[0], pooled[1], train=False)
    return 100.0 * float((out["logits"].argmax(1) == labels).sum()) / max(1, len(labels))


@dataclass
class StageBParts:
    """Skeletons stage B calls: the student, its projection head, the frozen teachers and MBM, adapters."""

    student: Net
    projection_train: torch.nn.Module
    teachers: tuple[Net, Net]
    mbm_eval: MBM
    adapters: tuple[torch.nn.Module, torch.nn.Module] | None
    z_dim: int


def stage_b_loss(parts: StageBParts, cfg: StageBConfig, total_steps: int):
    scale = latent_scale(cfg.latent_norm, parts.z_dim)

    def loss_fn(params, buffers, frozen, batch, step):
        r = progress(step, total_steps)
        ramp = kd_ramp(r, cfg.kd_warmup_frac, cfg.kd_pow)
        alpha_kd = lerp(cfg.kd_alpha_init, cfg.kd_alpha_final, ramp)
        temperature = lerp(cfg.kd_temperature_init, cfg.kd_temperature_final, ramp)
        lambda_latent = latent_weight(r, cfg.latent_alpha, cfg.latent_start)
        x = batch["x"]

        with torch.no_grad():  # targets: frozen teachers, MBM in eval mode (z = mu)
            teacher_pooled, teacher_maps = [], []
            for name, teacher in zip(("teacher1", "teacher2"), parts.teachers):
                _, feats, _ = apply_model(teacher.eval_skeleton, frozen[name]["params"], frozen[name]["buffers"],
                                          x, train=False)
                teacher_pooled.append(feats["pooled"])
                teacher_maps.append(feats.get(cfg.feature_stage))
            synergy, _ = call_stateless(parts.mbm_eval, frozen["mbm"], {}, teacher_pooled[0], teacher_pooled[1],
                                        train=False)

        logits, feats, student_buffers = apply_model(parts.student.train_skeleton, params["student"],
                                                     buffers["student"], x, train=True)
        z_student, projection_buffers = call_stateless(parts.projection_train, params["projection"],
                                                       buffers["projection"], feats["pooled"], train=True)
        mu, logvar = synergy["mu"].float(), synergy["logvar"].float()
        precision_max = kernels.precision_clamp_value(logvar)
        mse, ang, kd, ce = kernels.ib_student_loss(
            z_student, mu, logvar, precision_max, logits, synergy["logits"].float(), batch["y_a"], batch["y_b"],
            batch["lam"], temperature, label_smoothing=cfg.label_smoothing)
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
        new_buffers = {**buffers, "student": student_buffers, "projection": projection_buffers}
        return loss, (new_buffers, metrics)

    return loss_fn


def stage_b_clip(init: float, final: float, warmup_frac: float, total_steps: int):
    return lambda step: clip_threshold(progress(step, total_steps), init, final, warmup_frac)


def stage_b_reference_loss(z_student, mu, logvar, logits, synergy_logits, batch, temperature, label_smoothing):
    """The stage-B terms written out with plain torch ops (for tests and readers)."""
    precision = (1.0 / (logvar.exp() + 1e-6)).detach()
    precision = precision.clamp(max=torch.quantile(precision.flatten(), 0.99))
    mu_hat = F.normalize(mu, dim=1)
    mse = (precision * (z_student - mu_hat) ** 2).sum(1).mean()
    ang = 1 - F.cosine_similarity(z_student, mu, dim=1).mean()
    log_p_student = F.log_softmax(logits / temperature, 1)
    p_syn = F.softmax(synergy_logits / temperature, 1)
    kd = temperature**2 * (p_syn * (p_syn.log() - log_p_student)).sum(1).mean()
    ce = mixed_cross_entropy(logits, batch, label_smoothing)
    return mse, ang, kd, ce
