"""Benchmark: compiled functional train step vs an ordinary eager nn.Module + torch.optim loop (images/s)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd.config import ModelConfig, device_label, resolve_device
from kd.modeling import build_net
from kd.optim import sgd
from kd.step import apply_model, compile_step, init_state, make_train_step

from ._cli import parse


@dataclass(frozen=True)
class BenchStepConfig:
    """Same model, batch and optimizer for both loops; rounds alternate eager and compiled."""

    model: ModelConfig = ModelConfig(arch="resnet8x4")
    """Network to train."""
    batch_size: int = 64
    """Images per step."""
    num_classes: int = 100
    """Classifier width."""
    lr: float = 0.05
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    steps: int = 20
    """Timed steps per round."""
    warmup: int = 5
    """Untimed steps before timing (after compilation)."""
    rounds: int = 3
    """Interleaved rounds (eager, compiled, eager, compiled, ...); the median round is reported."""
    channels_last: bool = True
    """Channels-last memory format for images and weights (both loops)."""
    compile_mode: str = "default"
    """torch.compile mode of the functional step ('default', 'max-autotune-no-cudagraphs', 'reduce-overhead')."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    seed: int = 0
    """Seed of the weights and the synthetic batch."""


CONFIG = BenchStepConfig()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(cfg: BenchStepConfig) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    batch = {"x": x, "y_a": y, "y_b": y, "lam": torch.ones((), device=device)}

    # (a) the ordinary eager loop
    eager = build_net(cfg.model, cfg.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed).train_skeleton
    opt = torch.optim.SGD(eager.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def eager_step():
        logits, _ = eager(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # (b) the compiled functional step
    net = build_net(cfg.model, cfg.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed)
    optimizer = sgd(cfg.momentum, cfg.weight_decay)

    def loss_fn(params, buffers, frozen, b, step):
        logits, _, new_buffers = apply_model(net.train_skeleton, params["m"], buffers["m"], b["x"], train=True)
        return F.cross_entropy(logits, b["y_a"]), ({"m": new_buffers}, {})

    lr = torch.tensor(cfg.lr, device=device)
    step_fn = compile_step(make_train_step(loss_fn, optimizer, lambda s: lr, device_type=device.type), True,
                           mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    state = {"s": init_state({"m": net.params}, {"m": net.buffers}, optimizer, ema=False)}

    def functional_step():
        state["s"], _ = step_fn(state["s"], batch)

    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        functional_step()
        eager_step()
    _sync(device)
    print(f"warm-up (incl. compilation): {time.perf_counter() - t0:.1f} s", flush=True)

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(cfg.steps):
            fn()
        _sync(device)
        return cfg.batch_size * cfg.steps / (time.perf_counter() - start)

    eager_rates, compiled_rates = [], []
    for _ in range(cfg.rounds):
        eager_rates.append(timed(eager_step))
        compiled_rates.append(timed(functional_step))
    eager_ips, compiled_ips = statistics.median(eager_rates), statistics.median(compiled_rates)
    name = device_label(device)
    result = {"device": name, "torch": torch.__version__, "arch": cfg.model.arch, "batch_size": cfg.batch_size,
              "eager_images_per_s": eager_ips, "compiled_functional_images_per_s": compiled_ips,
              "speedup": compiled_ips / eager_ips}
    print(f"\n| loop | images/s (median of {cfg.rounds} rounds x {cfg.steps} steps) |\n|---|---|")
    print(f"| eager nn.Module + torch.optim | {eager_ips:.1f} |")
    print(f"| compiled functional step | {compiled_ips:.1f} |")
    print(f"\nspeed-up {result['speedup']:.2f}x  ({cfg.model.arch}, batch {cfg.batch_size}, SGD momentum, "
          f"{name}, torch {torch.__version__})")
    return result


def main(argv=None, prog="launch.py recipes.bench_step"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
