"""ASMB IB-KD (SPEC 6): two frozen teachers fused by an information bottleneck, the Manifold Bridging Module
(MBM), distil into a student; stage A trains the MBM, stage B the student, ``num_stages`` times.

Stage A (the MBM on cached features of the frozen teachers, :mod:`kd.stage_a`):
    CE(s, y) + beta * KL(q(z|f) || N(0, I))
  + student_kd * T_A^2 * w * KL(p_student || p_synergy)       (bridging; 0 by default)
where the student is frozen (eval mode, cached once per stage A) and w = clamp(exp(-mean logvar), min, 1)
is an optional per-sample confidence weight: the synergy is pulled towards what this student can follow.
The MBM samples ``z = mu + eps * std`` through the fused reparameterisation + KL kernel.

Stage B (the student, its projection head and optional feature adapters; the MBM in eval mode, z = mu):
    ce_alpha * CE + alpha_kd * KD(target) + lambda_lat * latent + gamma * feat
where the KD target is the synergy, the teachers' average, or per sample the one with the lower label CE
(``stage_b.kd_target``); the latent, KD and CE terms come from one fused kernel
(:func:`kernels.ib_student_loss`), every schedule is a function of the global step counter.

The MBM (``mbm.kind``):
    gate: h = g * W1 f1 + (1 - g) * W2 f2,  g = sigmoid(a per-channel parameter, initialised at 0)
    vib:  h = concat(f1, f2)
    attn: tokens t_i = W_i f_i, query q = W_q s (s: the student's pooled feature), per-sample weights
          a = softmax_i(q . t_i / sqrt(c)), h = sum_i a_i t_i ("adaptive" fusion)
    avg:  no MBM (an ablation): the teachers' average logits, no stage A and no latent term
then dropout(h) -> mu, logvar = clamp(W_lv h, -6, 2) -> synergy logits W_head z. Optional residual teacher
adapters (``stage_a.teacher_adapters``) transform each teacher's feature first; they train with the MBM.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import kernels
from kernels import reference as kernel_reference

from .. import tree as T
from ..checkpoint import load_train_state, load_weights, read_metadata, save_checkpoint
from ..config import compile_mode, to_dict
from ..distributed import barrier, convert_sync_bn, world
from ..errors import ConfigError
from ..loop import train_loop
from ..losses import pool_to
from ..models import feature_shapes
from ..modeling import Net
from ..optim import adamw, lerp, progress, ramp
from ..rundir import say
from ..stage_a import FeatureCache, accuracy, add_student, build_cache, cached_batches
from ..step import apply_model, call_stateless, compile_step, frozen_teacher, init_state, make_train_step
from ..supervised import constant
from ..teachers import FrozenTeachersConfig
from .base import TWO_TEACHERS, Loss, Method

LOGVAR_MIN, LOGVAR_MAX = -6.0, 2.0


@dataclass(frozen=True)
class MBMConfig:
    """The bottleneck that fuses the teachers."""

    kind: Literal["gate", "vib", "attn", "avg"] = "gate"
    """'gate': per-channel sigmoid gate between projected teachers; 'vib': concatenated teacher features;
    'attn': per-sample attention over the projected teachers, queried by the student's pooled feature (the
    frozen student's in stage A, the current student's, detached, in stage B); 'avg' (an ablation): no MBM,
    the synergy logits are the teachers' average logits, no stage A and no latent term."""
    z_dim: int = 512
    """Bottleneck (latent) width."""
    dropout: float = 0.1
    """Dropout on the fused representation (training only)."""


@dataclass(frozen=True)
class StageAConfig:
    """Stage A: the MBM trained on the frozen teachers' cached features (and, with student_kd, the frozen
    student's outputs)."""

    epochs: int = 20
    """MBM epochs per stage; the optimizer state continues from one stage A to the next."""
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
    student_kd: float = 0.0
    """Weight alpha_A of the bridging term T_A^2 * KL(p_student || p_synergy) (0 = a stage A that never sees
    the student)."""
    student_kd_temperature: float = 4.0
    """Temperature T_A of the bridging term."""
    student_kd_start: int = 0
    """Stage-A epochs (counted over all stages) of synergy-only training before the bridging term starts."""
    confidence_min: float = 1.0
    """Lower clamp of the per-sample weight exp(-mean logvar) on the bridging term (1 = no weight)."""
    teacher_adapters: int = 0
    """Hidden width of residual bottleneck adapters on each teacher's pooled feature, trained with the MBM
    (0 = none). The up-projection starts at zero, so an adapter starts as the identity."""


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
    kd_target: Literal["synergy", "average", "auto"] = "synergy"
    """Logits the KD term distils: the MBM's synergy, the teachers' average, or 'auto': per sample, the one of
    the two with the lower cross-entropy on the (mixed) label."""
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
class IBKDConfig(FrozenTeachersConfig):
    """Multi-teacher IB-KD (SPEC 6)."""

    mbm: MBMConfig = field(default_factory=MBMConfig)
    """The bottleneck module."""
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    """Stage A (MBM on frozen teachers)."""
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    """Stage B (student) loss weights and schedules."""
    num_stages: int = 1
    """Alternations of stage A then stage B on one student; the student epochs are split across stages, the
    optimizers and schedules run over all of them."""
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
        a = self.stage_a
        if a.cache_views < 1:
            raise ConfigError(f"stage_a.cache_views must be >= 1, got {a.cache_views}")
        if not (math.isfinite(a.student_kd) and a.student_kd >= 0):
            raise ConfigError(f"stage_a.student_kd must be a finite weight >= 0, got {a.student_kd}")
        if not (math.isfinite(a.student_kd_temperature) and a.student_kd_temperature > 0):
            raise ConfigError(f"stage_a.student_kd_temperature must be > 0, got {a.student_kd_temperature}")
        if not 0 < a.confidence_min <= 1:
            raise ConfigError(f"stage_a.confidence_min must be in (0, 1], got {a.confidence_min}")
        if a.student_kd_start < 0 or a.teacher_adapters < 0:
            raise ConfigError("stage_a.student_kd_start and stage_a.teacher_adapters must be >= 0")
        if self.mbm.kind == "avg" and (a.student_kd > 0 or self.stage_b.kd_target != "synergy"):
            raise ConfigError("mbm.kind avg has no MBM: stage_a.student_kd and stage_b.kd_target do not apply")


# ----------------------------------------------------------------------------------------------
# The modules


class Adapter(nn.Module):
    """A residual bottleneck on a pooled feature: ``f + W_up relu(W_down f)``, the identity at initialisation."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.up(torch.relu(self.down(f)))


class MBM(nn.Module):
    def __init__(self, cfg: MBMConfig, teacher_dims: tuple[int, int], num_classes: int, *, student_dim: int = 0,
                 adapters: int = 0, backend: str | None = None):
        super().__init__()
        if cfg.kind == "avg":
            raise ValueError("mbm.kind 'avg' has no MBM module (the teachers' logits are averaged instead)")
        self.kind = cfg.kind
        self.backend = backend  # kernels backend of the reparameterisation + KL (None = $KD_KERNELS / auto)
        c1, c2 = teacher_dims
        if adapters:
            self.adapters = nn.ModuleList([Adapter(c1, adapters), Adapter(c2, adapters)])
        if cfg.kind in ("gate", "attn"):
            width = max(c1, c2)
            self.proj1 = nn.Linear(c1, width)
            self.proj2 = nn.Linear(c2, width)
            if cfg.kind == "gate":
                self.gate = nn.Parameter(torch.zeros(width))
            else:
                if student_dim < 1:
                    raise ValueError("mbm.kind 'attn' needs the student's pooled width")
                self.query = nn.Linear(student_dim, width)
        else:
            width = c1 + c2
        self.width = width
        self.dropout = nn.Dropout(cfg.dropout)
        self.mu = nn.Linear(width, cfg.z_dim)
        self.logvar = nn.Linear(width, cfg.z_dim)
        self.head = nn.Linear(cfg.z_dim, num_classes)

    def forward(self, teacher1_pooled: Tensor, teacher2_pooled: Tensor, eps: Tensor | None = None,
                query: Tensor | None = None) -> dict[str, Tensor]:
        """Returns ``mu``, ``logvar``, ``z``, ``kl`` (per sample), ``logits`` (and the per-sample teacher
        ``weights`` for attn). ``eps`` (N, z_dim) is the reparameterisation noise: given in training, ``None``
        means the deterministic ``z = mu``. ``query`` (N, C_s): the student's pooled feature (attn only)."""
        # The inputs are constants: no gradient ever flows from the MBM into a teacher or the student.
        f1, f2 = teacher1_pooled.detach(), teacher2_pooled.detach()
        if hasattr(self, "adapters"):
            f1, f2 = self.adapters[0](f1), self.adapters[1](f2)
        out: dict[str, Tensor] = {}
        if self.kind == "gate":
            g = torch.sigmoid(self.gate)
            fused = g * self.proj1(f1) + (1 - g) * self.proj2(f2)
        elif self.kind == "attn":
            if query is None:
                raise ValueError("mbm.kind 'attn' needs the student's pooled feature as its query")
            tokens = torch.stack([self.proj1(f1), self.proj2(f2)], dim=1)  # (N, 2, c)
            # two tokens: elementwise products and sums (a batched matmul's rounding can depend on memory alignment)
            query = self.query(query.detach().float())
            scores = (query[:, None, :] * tokens).sum(dim=2) / math.sqrt(self.width)
            out["weights"] = torch.softmax(scores, dim=1)  # (N, 2): per-sample teacher weights
            fused = (out["weights"][:, :, None] * tokens).sum(dim=1)
        else:
            fused = torch.cat([f1, f2], dim=1)
        h = self.dropout(fused)
        mu = self.mu(h)
        logvar = self.logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)
        if eps is None:
            z, kl = mu, kernel_reference.ib_reparam_kl(mu, logvar, torch.zeros_like(mu))[1]
        else:
            z, kl = kernels.ib_reparam_kl(mu, logvar, eps, backend=self.backend)
        return {**out, "mu": mu, "logvar": logvar, "z": z, "kl": kl, "logits": self.head(z)}


class ProjectionHead(nn.Module):
    """Student pooled features -> the MBM latent space: Linear-BN-ReLU-Linear-BN, L2-normalised."""

    def __init__(self, in_dim: int, z_dim: int, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, z_dim)
        self.bn2 = nn.BatchNorm1d(z_dim)

    def forward(self, pooled: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.fc1(pooled)))
        return nn.functional.normalize(self.bn2(self.fc2(h)), dim=1)


def teacher_average(teacher_logits) -> Tensor:
    """The two teachers' mean logits (float32): the fixed-rule fusion the MBM is compared with."""
    return (teacher_logits[0].float() + teacher_logits[1].float()) / 2


def logit_spread(logits: Tensor) -> Tensor:
    """Mean over samples of the per-sample standard deviation of the logits (how sharp they are)."""
    return logits.float().std(dim=1).mean()


def synergy_scale_factor(synergy_logits: Tensor, teacher_logits) -> Tensor:
    """The constant that gives the synergy logits the spread of the teachers' average logits (no labels)."""
    return logit_spread(synergy_logits) / logit_spread(teacher_average(teacher_logits)).clamp_min(1e-12)


def latent_scale(norm: str, z_dim: int) -> float:
    return {"dim": 1.0 / z_dim, "sqrt": 1.0 / math.sqrt(z_dim), "none": 1.0}[norm]


def mixed_label_ce(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Per-sample ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``, shape (N,)."""
    logits = logits.float()
    lam = batch["lam"]
    return (lam * F.cross_entropy(logits, batch["y_a"], reduction="none")
            + (1 - lam) * F.cross_entropy(logits, batch["y_b"], reduction="none"))


def channel_normalized(feature_map: Tensor) -> Tensor:
    """Each channel's spatial map scaled to unit L2 norm: (N, C, H, W) -> same shape."""
    flat = rearrange(feature_map.float(), "n c h w -> n c (h w)")
    return F.normalize(flat, dim=2).view_as(feature_map)


def feature_alignment(adapted_student: Tensor, teacher_map: Tensor) -> Tensor:
    """IB-KD's optional feature term: MSE between per-channel L2-normalised maps (student adapted by a
    learned 1x1 conv to the teacher's channels, pooled to its size). Gradients reach the student."""
    student = channel_normalized(pool_to(adapted_student, teacher_map.shape[-2:]))
    return F.mse_loss(student, channel_normalized(teacher_map.detach()))


# ----------------------------------------------------------------------------------------------
# Stage A


def bridging_kl(student_logits: Tensor, synergy_logits: Tensor, temperature: float) -> Tensor:
    """Per sample ``T^2 * KL(softmax(s/T) || softmax(y/T))`` with the (constant) student as the reference."""
    log_p = F.log_softmax(student_logits.detach().float() / temperature, dim=1)
    log_q = F.log_softmax(synergy_logits.float() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1) * temperature**2


def stage_a_loss(mbm_train: MBM, cfg: StageAConfig, start_step: int = 0):
    """Stage A's loss on a batch of cached features ``f1``, ``f2``, labels and (with the bridging term or attn
    fusion) the frozen student's ``s_logits`` / ``s_pooled``: ``CE(s, y) + beta * mean KL`` plus, from
    global stage-A step ``start_step`` on, ``student_kd * mean(w * bridging_kl)``."""

    def loss_fn(params, buffers, frozen, batch, step):
        eps = torch.randn((batch["f1"].shape[0], mbm_train.mu.out_features), device=batch["f1"].device)
        out, _ = call_stateless(mbm_train, params["mbm"], {}, batch["f1"], batch["f2"], eps, batch.get("s_pooled"),
                                train=True)
        ce = F.cross_entropy(out["logits"].float(), batch["y_a"])
        kl = out["kl"].mean()
        loss = ce + cfg.beta * kl
        metrics = {"ce": ce.detach(), "kl": kl.detach()}
        if cfg.student_kd > 0:
            weight = torch.exp(-out["logvar"].float().mean(dim=1)).clamp(cfg.confidence_min, 1.0).detach()
            bridge = (weight * bridging_kl(batch["s_logits"], out["logits"], cfg.student_kd_temperature)).mean()
            on = (step >= start_step).float()  # a 0-d tensor: no recompilation when the term switches on
            loss = loss + on * cfg.student_kd * bridge
            metrics.update(student_kd=bridge.detach(), student_kd_on=on)
        return loss, (buffers, metrics)

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Stage B


@dataclass
class StageBParts:
    """Skeletons stage B calls: the student, its projection head, the frozen teachers and MBM, adapters."""

    student: Net
    projection_train: nn.Module | None  # None (like mbm_eval) for the plain-average ablation
    teachers: tuple[Net, Net]
    mbm_eval: MBM | None
    adapters: tuple[nn.Module, nn.Module] | None
    z_dim: int


def stage_b_loss(parts: StageBParts, cfg: StageBConfig, total_steps: int, backend: str | None = None):
    """The student's loss. ``backend`` picks the kernels (None = ``$KD_KERNELS`` / auto)."""
    scale = latent_scale(cfg.latent_norm, parts.z_dim)
    reads_maps = cfg.gamma > 0 and parts.adapters is not None  # the feature term: teachers' maps, never shared

    def loss_fn(params, buffers, frozen, batch, step):
        r = progress(step, total_steps)
        kd_ramp = ramp(r, cfg.kd_warmup_frac, power=cfg.kd_pow)
        alpha_kd = lerp(cfg.kd_alpha_init, cfg.kd_alpha_final, kd_ramp)
        temperature = lerp(cfg.kd_temperature_init, cfg.kd_temperature_final, kd_ramp)
        lambda_latent = cfg.latent_alpha * ramp(r, cfg.latent_start)

        logits, feats, student_buffers = apply_model(parts.student.train_skeleton, params["student"],
                                                     buffers["student"], batch["x"], train=True)
        new_buffers = {**buffers, "student": student_buffers}
        metrics: dict[str, Any] = {}
        with torch.no_grad():  # targets: frozen teachers, MBM in eval mode (z = mu)
            teacher_logits, teacher_pooled, teacher_maps = [], [], []
            for name, teacher in zip(("teacher1", "teacher2"), parts.teachers):
                logits_t, feats_t = frozen_teacher(name, teacher, frozen, batch, maps=reads_maps)
                teacher_logits.append(logits_t)
                teacher_pooled.append(feats_t["pooled"])
                teacher_maps.append(feats_t.get(cfg.feature_stage))
            average = teacher_average(teacher_logits)
            if parts.mbm_eval is None:  # ablation (mbm.kind "avg"): the plain average of the teachers
                synergy = {"logits": average}
            else:
                synergy, _ = call_stateless(parts.mbm_eval, frozen["mbm"], {}, *teacher_pooled, None,
                                            feats["pooled"].detach(), train=False)
                if "synergy_scale" in frozen:  # stage_b.synergy_scale "teachers"
                    synergy = {**synergy, "logits": synergy["logits"].float() / frozen["synergy_scale"]}
            target = synergy["logits"].float()
            if cfg.kd_target == "average":
                target = average
            elif cfg.kd_target == "auto":  # per sample, the target with the lower label CE
                pick = mixed_label_ce(target, batch) <= mixed_label_ce(average, batch)
                target = torch.where(pick[:, None], target, average)
                metrics["synergy_picked"] = pick.float().mean()

        if parts.mbm_eval is None:  # no bottleneck: no latent term
            kd = kernel_reference.distillation_kl(logits, F.log_softmax(target / temperature, dim=1), temperature)
            ce = kernel_reference.mixed_cross_entropy(logits, batch["y_a"], batch["y_b"], batch["lam"],
                                                      cfg.label_smoothing)
            latent = torch.zeros_like(ce)
        else:
            z_student, new_buffers["projection"] = call_stateless(
                parts.projection_train, params["projection"], buffers["projection"], feats["pooled"], train=True)
            mu, logvar = synergy["mu"].float(), synergy["logvar"].float()
            mse, ang, kd, ce = kernels.ib_student_loss(
                z_student, mu, logvar, kernels.precision_clamp_value(logvar), logits, target,
                batch["y_a"], batch["y_b"], batch["lam"], temperature, label_smoothing=cfg.label_smoothing,
                backend=backend)
            latent = (0.7 * mse + 0.3 * ang) * scale
        loss = cfg.ce_alpha * ce + alpha_kd * kd + lambda_latent * latent
        metrics.update(ce=ce.detach(), kd=kd.detach(), latent=latent.detach(), alpha_kd=alpha_kd,
                       temperature=temperature, lambda_latent=lambda_latent)
        if reads_maps:
            feat = sum(
                feature_alignment(call_stateless(adapter, params["adapters"][name], {}, feats[cfg.feature_stage],
                                                 train=True)[0], teacher_map)
                for name, adapter, teacher_map in zip(("teacher1", "teacher2"), parts.adapters, teacher_maps))
            loss = loss + cfg.gamma * feat
            metrics["feat"] = feat.detach()
        return loss, (new_buffers, metrics)

    return loss_fn


def stage_b_clip(init: float, final: float, warmup_frac: float, total_steps: int):
    """``step -> threshold``: ``init`` until progress ``warmup_frac``, then linear to ``final`` at the end. A threshold
    of 0 means no clipping (:func:`kd.step.clip_coefficient`): the original drove it towards 0 and clipped every
    gradient to nothing."""
    return lambda step: lerp(init, final, ramp(progress(step, total_steps), warmup_frac))


def student_heads(cfg: IBKDConfig, student: Net, teachers: tuple[Net, Net], device: torch.device
                  ) -> tuple[nn.Module | None, tuple[nn.Module, nn.Module] | None, T.Tree, T.Tree]:
    """Stage B's trainable heads beside the student: the projection head into the MBM's latent space and the
    feature term's 1x1 adapters; ``(projection, adapters, params, buffers)``."""
    shapes = feature_shapes(student.eval_skeleton)
    params, buffers = {}, {}
    projection = None
    if cfg.mbm.kind != "avg":
        projection = ProjectionHead(shapes["pooled"][1], cfg.mbm.z_dim).to(device).train()
        if cfg.dist.sync_bn and world().size > 1:
            convert_sync_bn(projection)
        params["projection"] = {n: p.detach() for n, p in projection.named_parameters()}
        buffers["projection"] = {n: b.detach() for n, b in projection.named_buffers()}
    adapters = None
    if cfg.stage_b.gamma > 0:
        s = cfg.stage_b.feature_stage
        if s not in shapes:
            raise ConfigError(f"{cfg.student.arch} has no feature map {s!r}")
        adapters = tuple(nn.Conv2d(shapes[s][1], feature_shapes(t.eval_skeleton)[s][1], 1).to(device).train()
                         for t in teachers)
        params["adapters"] = {name: {n: p.detach() for n, p in a.named_parameters()}
                              for name, a in zip(("teacher1", "teacher2"), adapters)}
        buffers["adapters"] = {}
    return projection, adapters, params, buffers


def build_mbm(cfg: IBKDConfig, teachers: tuple[Net, Net], student: Net, device: torch.device) -> MBM:
    """The MBM in training mode, initialised from ``cfg.seed``."""
    dims = tuple(feature_shapes(t.eval_skeleton)["pooled"][1] for t in teachers)
    torch.manual_seed(cfg.seed)
    return MBM(cfg.mbm, dims, student.num_classes, student_dim=feature_shapes(student.eval_skeleton)["pooled"][1],
               adapters=cfg.stage_a.teacher_adapters, backend=cfg.kernels).to(device).train()


# ----------------------------------------------------------------------------------------------
# The stages: stage A before each stage of student epochs


class IBKDStages:
    """IB-KD's :class:`~kd.methods.base.Stages`: the feature caches once, then before each stage of student
    epochs a stage A that trains the MBM (from the previous stage A's optimizer state, seeing the student the
    previous stage B produced) and puts its best-by-validation weights into the train state."""

    def __init__(self, cfg: IBKDConfig, student: Net, teachers: tuple[Net, Net], mbm_train: MBM | None,
                 mbm_eval: MBM | None, device: torch.device):
        self.cfg, self.student, self.teachers, self.device = cfg, student, teachers, device
        self.mbm_train, self.mbm_eval = mbm_train, mbm_eval
        self.count = cfg.num_stages
        self.caches: dict[str, FeatureCache] = {}
        self.sees_student = mbm_train is not None and (cfg.stage_a.student_kd > 0 or cfg.mbm.kind == "attn")

    def start(self, run, splits) -> dict[str, Any]:
        cfg = self.cfg
        self.run, self.splits = run, splits
        t0 = time.perf_counter()
        self.caches = {split: build_cache(list(self.teachers), data, splits, cfg.data, seed=cfg.seed,
                                          device=self.device, channels_last=cfg.channels_last,
                                          views=cfg.stage_a.cache_views if split == "train" else 1)
                       for split, data in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
        summary: dict[str, Any] = {"kernels": cfg.kernels, "cache_seconds": time.perf_counter() - t0}
        for i, (name, teacher) in enumerate(zip(("teacher1", "teacher2"), self.teachers)):
            for split in ("val", "test"):
                summary[f"{name}_{split}_acc"] = accuracy(self.caches[split].logits[i][0], self.caches[split].labels)
            say(f"{name} {teacher.arch}: val {summary[f'{name}_val_acc']:.2f}%  test {summary[f'{name}_test_acc']:.2f}%")
        return summary

    def synergy_logits(self, params: T.Tree, cache: FeatureCache) -> Tensor:
        """The MBM's synergy logits (eval mode) on view 0 of a cache (the teachers' average without an MBM)."""
        view = cache.view(0)
        with torch.no_grad():
            if self.mbm_eval is None:
                return teacher_average([cache.logits[0][0], cache.logits[1][0]])
            return call_stateless(self.mbm_eval, params, {}, view["f1"], view["f2"], None, view.get("s_pooled"),
                                  train=False)[0]["logits"]

    def synergy_accuracy(self, params: T.Tree, cache: FeatureCache) -> float:
        return accuracy(self.synergy_logits(params, cache), cache.labels)

    def before(self, stage: int, state: dict, *, done: bool) -> tuple[dict, dict[str, Any]]:
        run = self.run
        if self.mbm_train is None:  # mbm.kind avg: no stage A, the teachers' average
            numbers = {f"synergy_{split}_acc": self.synergy_accuracy({}, self.caches[split]) for split in ("val", "test")}
        elif done:  # finished before an interruption: its MBM is inside the restored state, its numbers on disk
            saved = read_metadata(run.path(f"mbm_stage{stage + 1}.safetensors"))
            numbers = {key: float(saved[key]) for key in ("synergy_val_acc", "synergy_test_acc")}
        else:
            mbm, numbers = self.train_stage_a(stage, state)
            state = {**state, "frozen": {**state["frozen"], "mbm": mbm}}
            if "synergy_scale" in state["frozen"]:
                scale = synergy_scale_factor(self.synergy_logits(mbm, self.caches["train"]),
                                             [self.caches["train"].logits[0][0], self.caches["train"].logits[1][0]])
                state["frozen"]["synergy_scale"] = scale.to(self.device)
                say(f"[stage A{stage + 1}] synergy logits divided by {float(scale):.3f} (teachers' spread)")
        if "synergy_scale" in state["frozen"]:
            numbers = {**numbers, "synergy_scale": float(state["frozen"]["synergy_scale"])}
        return state, {**{f"stage{stage + 1}_{key}": value for key, value in numbers.items()}, **numbers}

    def train_stage_a(self, stage: int, state: dict) -> tuple[T.Tree, dict[str, float]]:
        """Train the MBM for ``stage_a.epochs`` more epochs; keep the best-by-validation synergy accuracy.
        Deterministic, so a resumed run redoes an interrupted stage A identically."""
        cfg, run, device = self.cfg, self.run, self.device
        a, tag = cfg.stage_a, f"A{stage + 1}"
        if self.sees_student:  # the student of the previous stage B, frozen for this whole stage A
            for cache in self.caches.values():
                add_student(cache, self.student, state["params"]["student"], state["buffers"]["student"],
                            self.splits, cfg.data, device=device, channels_last=cfg.channels_last)
        optimizer = adamw(weight_decay=a.weight_decay, decoupled=False)  # Adam with L2 decay
        lr = torch.tensor(a.lr, device=device)
        train = self.caches["train"]
        batch_size = min(a.batch_size, len(train.labels))
        steps = len(train.labels) // batch_size
        step = compile_step(make_train_step(stage_a_loss(self.mbm_train, a, a.student_kd_start * steps), optimizer,
                                            lambda s: lr, clip_fn=constant(a.grad_clip_norm, device),
                                            device_type=device.type), cfg.compile, mode=compile_mode(cfg))
        mbm_state = init_state({"mbm": state["frozen"]["mbm"]}, {}, optimizer, ema=False)
        if stage > 0:  # the optimizer (and step counter) continue from the previous stage A's final state
            mbm_state, _ = load_train_state(run.path(f"A{stage}_last.safetensors"), expect={}, device=device,
                                            like=mbm_state)
        torch.manual_seed(cfg.seed * 1000 + stage)  # after the load, which restores the RNG it saved
        result = train_loop(
            cfg, run, state=mbm_state, train_step=step, splits=self.splits, device=device, part="mbm", eval_fn=None,
            weight_meta={"arch": f"mbm-{cfg.mbm.kind}"},
            batches=lambda epoch: cached_batches(train, batch_size, seed=cfg.seed * 1000 + stage, epoch=epoch,
                                                 rank=world().rank, world_size=world().size),
            steps=steps, epochs=(stage + 1) * a.epochs, tag=tag, resume_info={"epoch": stage * a.epochs},
            validate=lambda params, _buffers: self.synergy_accuracy(params, self.caches["val"]))
        best = load_weights(run.path(f"{tag}_best.safetensors"), expect={}, device=device)[0]["mbm"]
        test = self.synergy_accuracy(best, self.caches["test"])
        say(f"[stage {tag}] synergy val {result.best_val:.2f}%  test {test:.2f}% (best by val)")
        if world().main:
            save_checkpoint(run.path(f"mbm_stage{stage + 1}.safetensors"), {"params": {"mbm": best}},
                            {"kind": "mbm", "arch": f"mbm-{cfg.mbm.kind}", "synergy_val_acc": result.best_val,
                             "synergy_test_acc": test, "config": to_dict(cfg)})
        barrier()
        return best, {"synergy_val_acc": result.best_val, "synergy_test_acc": test}


def make_loss(cfg: IBKDConfig, student: Net, teachers: dict[str, Net], device: torch.device, total_steps: int) -> Loss:
    pair = (teachers["teacher1"], teachers["teacher2"])
    projection, adapters, params, buffers = student_heads(cfg, student, pair, device)
    mbm_train = mbm_eval = None
    frozen: dict[str, Any] = {"mbm": {}}
    if cfg.mbm.kind != "avg":
        mbm_train = build_mbm(cfg, pair, student, device)
        mbm_eval = copy.deepcopy(mbm_train).eval()
        frozen["mbm"] = {n: p.detach() for n, p in mbm_train.named_parameters()}
        if cfg.stage_b.synergy_scale == "teachers":  # set after each stage A; restored with the MBM on resume
            frozen["synergy_scale"] = torch.ones((), device=device)
    parts = StageBParts(student, projection, pair, mbm_eval, adapters, cfg.mbm.z_dim)
    return Loss(stage_b_loss(parts, cfg.stage_b, total_steps, backend=cfg.kernels), params=params, buffers=buffers,
                frozen=frozen,
                clip=stage_b_clip(cfg.grad_clip_norm_init, cfg.grad_clip_norm_final, cfg.grad_clip_warmup_frac,
                                  total_steps),
                stages=IBKDStages(cfg, student, pair, mbm_train, mbm_eval, device))


METHOD = Method("ibkd", make_loss, TWO_TEACHERS, maps=lambda cfg: cfg.stage_b.gamma > 0)
