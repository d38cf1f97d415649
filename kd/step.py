"""The pure training step.

    state, metrics = train_step(state, batch)

``state`` is a dict of trees (nothing else):
    params   trainable parameters, one sub-tree per trainable part ({"student": ..., "proj": ...})
    buffers  their buffers (BatchNorm statistics): the step returns the updated statistics
    opt      optimizer state
    ema      {"params", "buffers"} exponential moving average of params and buffers (optional)
    frozen   constant trees the loss reads (frozen teachers, a frozen MBM); returned unchanged
    step     0-d int64 counter
    scaler   {"scale", "growth"} for fp16 loss scaling (optional)

Gradient, clipping, optimizer, EMA and schedules all run inside one function, which is compiled once
with ``torch.compile``: schedules are functions of ``state["step"]``, every scalar is a 0-d tensor, and
nothing reads a value back to the host. Models are called through ``torch.func.functional_call``;
gradients come from ``torch.autograd.grad`` over the loss *inside* the compiled function, not from
``torch.func.grad``: see :func:`value_and_grad` for why (pytorch/pytorch#193279). That is the one place
in the project that works around it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kernels import reference as kernel_reference

from . import tree as T
from .distributed import mean_across_ranks, world
from .optim import Optimizer

if TYPE_CHECKING:
    from .modeling import Net

Metrics = dict[str, Tensor]
# loss_fn(params, buffers, frozen, batch, step) -> (loss, (new_buffers, metrics))
LossFn = Callable[[T.Tree, T.Tree, T.Tree, dict[str, Tensor], Tensor], tuple[Tensor, tuple[T.Tree, Metrics]]]


@dataclass(frozen=True)
class AmpConfig:
    """Automatic mixed precision."""

    dtype: Literal["none", "bf16", "fp16"] = "none"
    """Autocast dtype for the forward pass. fp16 uses a loss scaler; bf16 needs none."""
    grad_scaler_init_scale: float = 1024.0
    """fp16 only: initial loss scale of the grad scaler."""
    growth_interval: int = 2000
    """fp16 only: finite steps before the loss scale doubles (halved on any non-finite step)."""


def autocast_dtype(amp: AmpConfig) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp.dtype]


def apply_model(model: nn.Module, params: T.Tree, buffers: T.Tree, x: Tensor, *, train: bool
                ) -> tuple[Tensor, dict[str, Tensor], T.Tree]:
    """Stateless forward: ``(logits, features, new_buffers)``.

    ``model`` must be in the mode asked for (keep one skeleton per mode: toggling ``.train()`` on a
    compiled module recompiles). In training mode the buffers are cloned first, so BatchNorm's in-place
    running-statistics update lands on the copies that are returned, never on the caller's state.
    """
    (logits, features), new_buffers = call_stateless(model, params, buffers, x, train=train)
    return logits, features, new_buffers


def call_stateless(module: nn.Module, params: T.Tree, buffers: T.Tree, *args: Any, train: bool) -> tuple[Any, T.Tree]:
    """``functional_call`` that returns ``(output, new_buffers)``; buffers are copied first in training."""
    if module.training != train:
        raise RuntimeError(f"{type(module).__name__} skeleton is in {'train' if module.training else 'eval'} mode, "
                           f"asked for {'train' if train else 'eval'}: use a skeleton per mode")
    new_buffers = T.clone(buffers) if train else buffers
    return functional_call(module, (params, new_buffers), args), new_buffers


def mixed_cross_entropy(logits: Tensor, batch: dict[str, Tensor], label_smoothing: float = 0.0) -> Tensor:
    """:func:`kernels.reference.mixed_cross_entropy` on a batch's ``y_a``, ``y_b``, ``lam``."""
    return kernel_reference.mixed_cross_entropy(logits, batch["y_a"], batch["y_b"], batch["lam"], label_smoothing)


def value_and_grad(fn: Callable[..., tuple[Tensor, Any]]) -> Callable[..., tuple[T.Tree, tuple[Tensor, Any]]]:
    """``fn(params, *args) -> (loss, aux)`` to ``(grads, (loss, aux))``, gradients w.r.t. ``params``.

    Why ``torch.autograd.grad`` and not ``torch.func.grad_and_value``: under ``torch.compile``, torch
    (2.11 to 2.14.1 at least) silently drops an ``autograd.Function``'s custom backward inside a
    torch.func transform (pytorch/pytorch#193279), so a compiled ``func.grad`` step could not run the
    project's Triton kernels (their ops have no autograd formula but the custom backward) and would
    differentiate anything else wrongly. ``torch.autograd.grad`` inside the compiled function, traced
    with ``torch._dynamo.config.trace_autograd_ops`` (set by :class:`TrainStep`), keeps the custom
    backward on every admitted version, provided the leaves arrive already requiring grad (torch 2.11
    refuses ``requires_grad_()`` inside a graph): :class:`TrainStep` makes them so before the call.
    Eagerly the same code is plain autograd. Unused leaves get zero gradients, like torch.func.
    """

    def wrapped(params: T.Tree, *args: Any) -> tuple[T.Tree, tuple[Tensor, Any]]:
        loss, aux = fn(params, *args)
        leaves = T.leaves(params)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
        return T.map_like(params, grads), (loss.detach(), aux)

    return wrapped


def _grad_leaves(params: T.Tree) -> T.Tree:
    """Fresh leaves that require grad, sharing storage with ``params`` (no copy, no sync)."""
    return T.tree_map(lambda p: p.detach().requires_grad_(p.is_floating_point()), params)


class TrainStep:
    """``train_step(state, batch) -> (new_state, metrics)``.

    A thin host-side shell around the pure ``body``: it hands ``body`` parameters that are leaves
    requiring grad (see :func:`value_and_grad`) and turns on ``trace_autograd_ops`` so that
    ``torch.compile`` traces the ``torch.autograd.grad`` call into the same graph. ``compiled()``
    compiles the body, never the shell.
    """

    def __init__(self, body: Callable[[T.Tree, dict[str, Tensor]], tuple[T.Tree, Metrics]]):
        self.body = body

    def __call__(self, state: T.Tree, batch: dict[str, Tensor]) -> tuple[T.Tree, Metrics]:
        state = {**state, "params": _grad_leaves(state["params"])}
        with torch.enable_grad(), torch._dynamo.config.patch(trace_autograd_ops=True):
            return self.body(state, batch)

    def compiled(self, *, mode: str | None = None) -> "TrainStep":
        return TrainStep(torch.compile(self.body, fullgraph=True, dynamic=False, mode=mode))


def global_norm(grads: T.Tree) -> Tensor:
    norms = torch._foreach_norm([g.float() for g in T.leaves(grads)])
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_coefficient(norm: Tensor, threshold: Tensor) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s factor; a threshold <= 0 switches clipping off (factor 1),
    it never clips to zero."""
    coef = (threshold / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(threshold > 0, coef, torch.ones_like(coef))


def ema_decay(step: Tensor, max_decay: float = 0.9999) -> Tensor:
    """``min(max_decay, (1 + t) / (10 + t))``: short memory early, long memory later."""
    t = step.float()
    return torch.clamp((1 + t) / (10 + t), max=max_decay)


def ema_update(ema: T.Tree, new: T.Tree, decay: Tensor) -> T.Tree:
    """Floating leaves move towards ``new``; integer leaves (BN's ``num_batches_tracked``) are copied."""
    def one(e: Tensor, n: Tensor) -> Tensor:
        if not e.is_floating_point():
            return n.clone()
        return e * decay + n.detach() * (1 - decay)
    return T.tree_map(one, ema, new)


def init_state(params: T.Tree, buffers: T.Tree, optimizer: Optimizer, *, frozen: T.Tree | None = None,
               ema: bool = True, amp: AmpConfig = AmpConfig()) -> T.Tree:
    params = T.detach(params)
    device = T.leaves(params)[0].device
    state: T.Tree = {
        "params": params,
        "buffers": T.detach(buffers),
        "opt": optimizer.init(params),
        "frozen": T.detach(frozen or {}),
        "step": torch.zeros((), dtype=torch.int64, device=device),
    }
    if ema:
        state["ema"] = {"params": T.clone(state["params"]), "buffers": T.clone(state["buffers"])}
    if amp.dtype == "fp16":
        state["scaler"] = {"scale": torch.tensor(amp.grad_scaler_init_scale, device=device),
                           "growth": torch.zeros((), dtype=torch.int64, device=device)}
    return state


def make_train_step(loss_fn: LossFn, optimizer: Optimizer, lr_fn: Callable[[Tensor], Tensor], *,
                    clip_fn: Callable[[Tensor], Tensor] | None = None, amp: AmpConfig = AmpConfig(),
                    device_type: str = "cpu") -> TrainStep:
    """Build ``train_step(state, batch) -> (new_state, metrics)``; compile it with :func:`compile_step`.

    ``lr_fn`` and ``clip_fn`` map the step counter to a 0-d learning rate / clipping threshold
    (threshold <= 0: no clipping).
    """
    dtype = autocast_dtype(amp)
    use_scaler = amp.dtype == "fp16"

    def scaled_loss(params, buffers, frozen, batch, step, scale):
        ctx = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            loss, (new_buffers, metrics) = loss_fn(params, buffers, frozen, batch, step)
        loss = loss.float()
        return (loss * scale if use_scaler else loss), (loss.detach(), new_buffers, metrics)

    def train_step(state: T.Tree, batch: dict[str, Tensor]) -> tuple[T.Tree, Metrics]:
        step = state["step"]
        scale = state["scaler"]["scale"] if use_scaler else None
        grads, (_, (loss, new_buffers, metrics)) = value_and_grad(scaled_loss)(
            state["params"], state["buffers"], state["frozen"], batch, step, scale)
        with torch.no_grad():
            if world().size > 1:  # data parallel: the mean over ranks = the gradient of the global batch
                # one all-reduce for all of it; the logged values are those of the global batch too
                mean = mean_across_ranks({"grads": grads, "buffers": new_buffers, "metrics": metrics, "loss": loss})
                grads, new_buffers, metrics, loss = mean["grads"], mean["buffers"], mean["metrics"], mean["loss"]
            return update(state, grads, loss, new_buffers, metrics, step, scale)

    def update(state, grads, loss, new_buffers, metrics, step, scale):
        if use_scaler:
            grads = T.tree_map(lambda g: g / scale, grads)
        norm = global_norm(grads)
        threshold = clip_fn(step) if clip_fn is not None else torch.zeros((), device=norm.device)
        if clip_fn is not None:  # a Python-level choice made once per recipe, not a branch on a tensor
            coef = clip_coefficient(norm, threshold)
            grads = T.tree_map(lambda g: g * coef.to(g.dtype), grads)
        lr = lr_fn(step)
        params, opt_state = optimizer.update(grads, state["opt"], state["params"], lr)

        new_state = dict(state)
        if use_scaler:
            # Skip the whole update on a non-finite gradient and back off the scale (functional GradScaler).
            finite = torch.isfinite(norm)
            keep = lambda new, old: torch.where(finite, new, old)  # noqa: E731
            params = T.tree_map(keep, params, state["params"])
            opt_state = T.tree_map(keep, opt_state, state["opt"])
            new_buffers = T.tree_map(keep, new_buffers, state["buffers"])
            growth = torch.where(finite, state["scaler"]["growth"] + 1, torch.zeros_like(state["scaler"]["growth"]))
            grow = growth >= amp.growth_interval
            new_scale = torch.where(finite, torch.where(grow, scale * 2, scale), scale * 0.5)
            new_state["scaler"] = {"scale": new_scale, "growth": torch.where(grow, torch.zeros_like(growth), growth)}
            metrics = {**metrics, "loss_scale": scale, "skipped": (~finite).float()}

        new_state["params"] = params
        new_state["opt"] = opt_state
        new_state["buffers"] = new_buffers
        new_state["step"] = step + 1
        if "ema" in state:
            decay = ema_decay(step)
            new_state["ema"] = {"params": ema_update(state["ema"]["params"], params, decay),
                                "buffers": ema_update(state["ema"]["buffers"], new_buffers, decay)}
        metrics = {**metrics, "loss": loss, "grad_norm": norm, "lr": lr, "clip": threshold}
        return new_state, metrics

    return TrainStep(train_step)


def compile_step(fn: Callable, enabled: bool, *, mode: str | None = None) -> Callable:
    """``torch.compile`` a step (a :class:`TrainStep`'s pure body, or an eval function) as one graph."""
    if not enabled:
        return fn
    if isinstance(fn, TrainStep):
        return fn.compiled(mode=mode)
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def make_eval_fn(model: nn.Module) -> Callable[[T.Tree, T.Tree, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """``(params, buffers, x) -> (logits, features)`` in eval mode, no gradient."""
    if model.training:
        raise RuntimeError("make_eval_fn needs the eval-mode skeleton")

    def evaluate(params: T.Tree, buffers: T.Tree, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            logits, features, _ = apply_model(model, params, buffers, x, train=False)
        return logits, features

    return evaluate


def accuracy_counts(logits: Tensor, labels: Tensor) -> Tensor:
    """Number of correct top-1 predictions, as a 0-d tensor (summed on the device, read once)."""
    return (logits.argmax(dim=1) == labels).sum()


def read_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The one host sync: turn device scalars into floats (call every N steps, not every step)."""
    return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# Frozen teachers inside a loss: their outputs from the batch when shared (kd/teacher_outputs.py), else their forward

PREFIX = "teacher_out"  # batch entries added by a kd.teacher_outputs stream


def batch_key(name: str, what: str) -> str:
    """The batch entry holding teacher ``name``'s ``what`` ("logits" or "pooled")."""
    return f"{PREFIX}.{name}.{what}"


def frozen_teacher(name: str, net: "Net", frozen: dict, batch: dict[str, Tensor], *, maps: bool = False
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Teacher ``name``'s ``(logits, features)`` on ``batch["x"]`` (eval mode, no gradient): taken from the
    batch when a :class:`kd.teacher_outputs.TeacherOutputs` stream put them there (features: ``{"pooled": ...}`` only), else
    the forward runs here. ``maps``: the caller needs the feature maps, so the forward always runs."""
    key = batch_key(name, "logits")
    if key in batch and not maps:
        return batch[key], {"pooled": batch[batch_key(name, "pooled")]}
    with torch.no_grad():
        logits, features, _ = apply_model(net.eval_skeleton, frozen[name]["params"], frozen[name]["buffers"],
                                          batch["x"], train=False)
    return logits, features
