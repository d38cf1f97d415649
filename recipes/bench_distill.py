"""Benchmark: whole distillation train steps (IB-KD stage B, AT) with the Triton kernels vs the references.

For each method and batch size, images/s and peak memory of three ways to run the same step:
``compiled+triton`` (the default on a GPU), ``compiled+reference`` (the references fused by Inductor)
and ``eager+reference``. CIFAR shapes: resnet8x4 student, resnet32x4 + wrn_40_2 teachers (AT uses the
first), 32x32 inputs. Writes ``bench_distill.md`` and ``bench_distill.csv`` into ``--out``.

    python launch.py recipes.bench_distill --out results/            # on a GPU
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from kd.config import ModelConfig, device_label, resolve_device
from kd.ibkd import StageBConfig, StageBParts, stage_b_loss
from kd.mbm import MBM, MBMConfig, ProjectionHead
from kd.modeling import build_net
from kd.models import feature_shapes
from kd.optim import adamw
from kd.step import compile_step, init_state, make_train_step

from ._cli import parse

Provider = Literal["compiled+triton", "compiled+reference", "eager+triton", "eager+reference"]


@dataclass(frozen=True)
class BenchDistillConfig:
    """What to time."""

    methods: tuple[Literal["ibkd_stage_b", "at"], ...] = ("ibkd_stage_b", "at")
    """Train steps to time."""
    batch_sizes: tuple[int, ...] = (64, 256)
    """Images per step."""
    providers: tuple[Provider, ...] = ("compiled+triton", "compiled+reference", "eager+reference")
    """How the step runs (kernels backend and compilation)."""
    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """Student."""
    teacher1: ModelConfig = ModelConfig(arch="resnet32x4")
    """First teacher (AT's teacher)."""
    teacher2: ModelConfig = ModelConfig(arch="wrn_40_2")
    """Second teacher (IB-KD)."""
    num_classes: int = 100
    """Classes (CIFAR-100)."""
    z_dim: int = 512
    """IB latent width."""
    steps: int = 30
    """Timed steps per round."""
    warmup: int = 5
    """Untimed steps first (compilation happens here)."""
    rounds: int = 3
    """Timed rounds; the median is reported."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    out: str = "reports"
    """Folder for bench_distill.md and bench_distill.csv."""


CONFIG = BenchDistillConfig()


def build_step(cfg: BenchDistillConfig, method: str, provider: str, batch_size: int, device: torch.device):
    """``(step, state, batch)`` for one method, provider and batch size."""
    compiled, backend = provider.split("+")
    torch.manual_seed(0)
    student = build_net(cfg.student, cfg.num_classes, device, seed=0)
    teachers = [build_net(m, cfg.num_classes, device, seed=i + 1) for i, m in enumerate((cfg.teacher1, cfg.teacher2))]
    frozen = {f"teacher{i + 1}": {"params": t.params, "buffers": t.buffers} for i, t in enumerate(teachers)}
    params, buffers = {"student": student.params}, {"student": student.buffers}
    if method == "ibkd_stage_b":
        dims = tuple(feature_shapes(t.eval_skeleton)["pooled"][1] for t in teachers)
        mbm = MBM(MBMConfig(z_dim=cfg.z_dim), dims, cfg.num_classes).to(device).eval()
        projection = ProjectionHead(feature_shapes(student.eval_skeleton)["pooled"][1], cfg.z_dim).to(device).train()
        params["projection"] = {n: p.detach() for n, p in projection.named_parameters()}
        buffers["projection"] = {n: b.detach() for n, b in projection.named_buffers()}
        frozen["mbm"] = {n: p.detach() for n, p in mbm.named_parameters()}
        parts = StageBParts(student, projection, tuple(teachers), mbm, None, cfg.z_dim)
        loss_fn = stage_b_loss(parts, StageBConfig(), total_steps=1000, backend=backend)
    else:
        from recipes import at

        at_cfg = dataclasses.replace(at.CONFIG, kernels=backend)
        loss_fn, _, _ = at.attention_loss(at_cfg, student, teachers[0], device)
        frozen = {"teacher": frozen["teacher1"]}
    optimizer = adamw(weight_decay=5e-4)
    lr = torch.tensor(1e-3, device=device)
    step = compile_step(make_train_step(loss_fn, optimizer, lambda s: lr, device_type=device.type), compiled == "compiled")
    state = init_state(params, buffers, optimizer, frozen=frozen, ema=True)
    y = torch.randint(0, cfg.num_classes, (batch_size,), device=device)
    batch = {"x": torch.randn(batch_size, 3, 32, 32, device=device), "y_a": y, "y_b": y.roll(1),
             "lam": torch.tensor(0.7, device=device)}
    return step, state, batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: BenchDistillConfig, method: str, provider: str, batch_size: int, device: torch.device) -> dict:
    step, state, batch = build_step(cfg, method, provider, batch_size, device)
    holder = {"state": state}

    def run_steps(n: int) -> None:
        for _ in range(n):
            holder["state"], _ = step(holder["state"], batch)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run_steps(cfg.warmup)
    _sync(device)
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(cfg.rounds):
        _sync(device)
        t0 = time.perf_counter()
        run_steps(cfg.steps)
        _sync(device)
        rates.append(batch_size * cfg.steps / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"method": method, "batch_size": batch_size, "provider": provider,
            "images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "peak_memory_mib": peak, "warmup_s": warmup_s}


def run(cfg: BenchDistillConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    name = device_label(device)
    rows = []
    for method in cfg.methods:
        for batch_size in cfg.batch_sizes:
            for provider in cfg.providers:
                row = measure(cfg, method, provider, batch_size, device)
                print(f"{method:13s} batch {batch_size:4d}  {provider:19s} {row['images_per_s']:9.1f} images/s  "
                      f"peak {row['peak_memory_mib']:.0f} MiB", flush=True)
                rows.append(row)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    header = (f"{name}, torch {torch.__version__}, triton {triton_version}, {time.strftime('%Y-%m-%d')}; "
              f"student {cfg.student.arch}, teachers {cfg.teacher1.arch} + {cfg.teacher2.arch}, AdamW, "
              f"median of {cfg.rounds} rounds x {cfg.steps} steps after {cfg.warmup} warm-up steps")
    lines = [header, "", "| method | batch | provider | images/s | min..max | peak memory (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['provider']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_min']:.1f}..{r['images_per_s_max']:.1f} | {r['peak_memory_mib']:.0f} |")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.md").write_text("\n".join(lines) + "\n")
    with open(out / "bench_distill.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n" + "\n".join(lines))
    return rows


def main(argv=None, prog="launch.py recipes.bench_distill"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
