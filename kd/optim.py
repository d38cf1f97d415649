"""Pure optimizers and learning-rate schedules.

An optimizer is a pair of pure functions (Optax style):

    opt_state = opt.init(params)
    params, opt_state = opt.update(grads, opt_state, params, lr)

``params``/``grads`` are nested dicts of tensors, ``lr`` a 0-d tensor (it changes every step and must
not trigger a recompile). Nothing is mutated: every update allocates new tensors (foreach ops, so the
whole update is a handful of fused loops, and under ``torch.compile`` a single kernel per group).
The arithmetic follows ``torch.optim.SGD`` / ``torch.optim.AdamW`` exactly (tests compare 20 steps).

Schedules are pure functions of the step, written with tensor ops so they run inside the compiled step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from . import tree as T
from .errors import ConfigError


class Optimizer(NamedTuple):
    init: Callable[[T.Tree], T.Tree]
    update: Callable[[T.Tree, T.Tree, T.Tree, Tensor], tuple[T.Tree, T.Tree]]


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    """Optimizer: SGD (momentum, optional Nesterov), Adam (L2 weight decay) or AdamW (decoupled weight decay)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 5e-4
    """Weight decay (L2 added to the gradient for SGD, decoupled for AdamW)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    """Learning-rate schedule, evaluated per step."""
    warmup_epochs: float = 5.0
    """Linear warm-up length in epochs (0 = none)."""
    min_lr_ratio: float = 0.05
    """Cosine: final learning rate as a fraction of ``lr``."""
    milestones: tuple[int, ...] = (150, 180, 210)
    """Multistep: epochs at which the learning rate is multiplied by ``gamma``."""
    gamma: float = 0.1
    """Multistep decay factor."""

    def __post_init__(self) -> None:
        # (the range checks below also refuse NaN: every comparison with NaN is false)
        for name in ("lr", "weight_decay", "eps", "warmup_epochs", "gamma"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--optim.{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--optim.weight-decay must be >= 0 (0 = off), got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--optim.momentum must be in [0, 1), got {self.momentum}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"--optim.betas must both be in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"--optim.eps must be > 0, got {self.eps}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"--optim.warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--optim.min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.gamma <= 0:
            raise ConfigError(f"--optim.gamma must be > 0, got {self.gamma}")
        if any(m < 0 for m in self.milestones):
            raise ConfigError(f"--optim.milestones must be >= 0, got {self.milestones}")


def sgd(momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False) -> Optimizer:
    """``torch.optim.SGD`` with dampening 0: momentum buffer starts at zero, which equals torch's
    "first step copies the gradient" rule because ``m * 0 + d = d``."""

    def init(params: T.Tree) -> T.Tree:
        return {"momentum": T.tree_map(torch.zeros_like, params)}

    def update(grads: T.Tree, state: T.Tree, params: T.Tree, lr: Tensor) -> tuple[T.Tree, T.Tree]:
        p = T.leaves(params)
        d = T.leaves(grads)
        if weight_decay:
            d = torch._foreach_add(d, p, alpha=weight_decay)
        buf = torch._foreach_add(torch._foreach_mul(T.leaves(state["momentum"]), momentum), d)
        direction = torch._foreach_add(d, buf, alpha=momentum) if nesterov else buf
        new_p = torch._foreach_sub(p, torch._foreach_mul(direction, lr))
        return T.map_like(params, new_p), {"momentum": T.map_like(params, buf)}

    return Optimizer(init, update)


def adamw(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          decoupled: bool = True) -> Optimizer:
    """``torch.optim.AdamW`` (no amsgrad); with ``decoupled=False`` it is ``torch.optim.Adam`` whose weight
    decay is an L2 term added to the gradient. The step counter lives in the state as a 0-d tensor."""
    beta1, beta2 = betas

    def init(params: T.Tree) -> T.Tree:
        first = next(iter(T.leaves(params)))
        return {
            "count": torch.zeros((), dtype=torch.float64, device=first.device),  # fp64: beta2**t in fp32 drifts
            "mu": T.tree_map(torch.zeros_like, params),
            "nu": T.tree_map(torch.zeros_like, params),
        }

    def update(grads: T.Tree, state: T.Tree, params: T.Tree, lr: Tensor) -> tuple[T.Tree, T.Tree]:
        count = state["count"] + 1
        p = T.leaves(params)
        g = T.leaves(grads)
        if decoupled:
            p = torch._foreach_mul(p, 1 - lr * weight_decay)
        elif weight_decay:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        mu = torch._foreach_add(torch._foreach_mul(T.leaves(state["mu"]), beta1), g, alpha=1 - beta1)
        nu = torch._foreach_addcmul(torch._foreach_mul(T.leaves(state["nu"]), beta2), g, g, value=1 - beta2)
        bias1 = 1 - beta1**count
        bias2_sqrt = (1 - beta2**count).sqrt()
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(nu), bias2_sqrt), eps)
        step = torch._foreach_mul(torch._foreach_div(mu, denom), lr / bias1)
        new_p = torch._foreach_sub(p, step)
        new_state = {"count": count, "mu": T.map_like(params, mu), "nu": T.map_like(params, nu)}
        return T.map_like(params, new_p), new_state

    return Optimizer(init, update)


def build_optimizer(cfg: OptimConfig) -> Optimizer:
    if cfg.name == "sgd":
        return sgd(cfg.momentum, cfg.weight_decay, cfg.nesterov)
    return adamw(cfg.betas, cfg.eps, cfg.weight_decay, decoupled=cfg.name == "adamw")


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the (0-d tensor) step. They are evaluated inside the compiled step.


def warmup_cosine(step: Tensor, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float) -> Tensor:
    """Linear warm-up from ``base_lr/warmup`` to ``base_lr``, then cosine to ``min_ratio*base_lr``."""
    step = torch.as_tensor(step, dtype=torch.float32)
    warm = base_lr * (step + 1) / max(1, warmup_steps)
    progress = ((step - warmup_steps) / max(1, total_steps - warmup_steps)).clamp(0.0, 1.0)
    cosine = base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + torch.cos(math.pi * progress)))
    return torch.where(step < warmup_steps, warm, cosine)


def multistep(step: Tensor, milestones_steps: tuple[int, ...], base_lr: float, gamma: float,
              warmup_steps: int = 0) -> Tensor:
    """``base_lr * gamma ** (number of milestones passed)``, with an optional linear warm-up."""
    step = torch.as_tensor(step, dtype=torch.float32)
    passed = sum((step >= m).float() for m in milestones_steps) if milestones_steps else torch.zeros_like(step)
    lr = base_lr * gamma**passed
    if warmup_steps:
        lr = torch.where(step < warmup_steps, base_lr * (step + 1) / warmup_steps, lr)
    return lr


def lr_schedule(cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> Callable[[Tensor], Tensor]:
    """The configured schedule as ``step -> lr`` (0-d tensors)."""
    total = steps_per_epoch * epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        return lambda step: warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr_ratio)
    if cfg.schedule == "multistep":
        milestones = tuple(m * steps_per_epoch for m in cfg.milestones)
        return lambda step: multistep(step, milestones, cfg.lr, cfg.gamma, warmup)
    return lambda step: torch.full_like(torch.as_tensor(step, dtype=torch.float32), cfg.lr)


# ----------------------------------------------------------------------------------------------
# Loss schedules: every weight that changes over training is lerp(start, end, ramp(progress(step), ...)).
# 0-d tensors in and out, so they run inside the compiled step without recompiling.


def progress(step: Tensor, total_steps: int) -> Tensor:
    """``r = step / (total_steps - 1)`` clamped to [0, 1]: the training progress."""
    return (step.float() / max(1, total_steps - 1)).clamp(0.0, 1.0)


def lerp(start: float, end: float, weight: Tensor) -> Tensor:
    return start + (end - start) * weight


def ramp(r: Tensor, start: float = 0.0, end: float = 1.0, power: float = 1.0) -> Tensor:
    """0 until progress ``r = start``, linear to 1 at ``r = end``, 1 after; raised to ``power``. ``end <= start``
    is a step at ``start`` (so a warm-up over 0 % of training is 1 from the first step)."""
    if end <= start:
        return (r >= start).float()
    return ((r - start) / (end - start)).clamp(0.0, 1.0) ** power
