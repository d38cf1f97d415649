"""Benchmark: whole distillation train steps (IB-KD stage B, AT, KD) with the Triton kernels vs the references.

For each method and batch size, images/s and peak memory of the ways to run the same step:
``compiled+triton`` (the default on a GPU), ``compiled+reference`` (the references fused by Inductor),
``eager+reference``, and the CUDA-graph variants ``compiled+triton+cudagraphs`` and
``compiled+reference+cudagraphs`` (torch.compile mode "reduce-overhead": the whole step replayed as one CUDA
graph; CUDA only, skipped with a note elsewhere). CIFAR shapes: resnet8x4 student, resnet32x4 + wrn_40_2
teachers (AT and KD use the first), 32x32 inputs. ``kd`` (add it to ``--methods``) is the peer CIFAR-100 table's
Hinton KD step (resnet32x4 -> resnet8x4, SGD, T 4, alpha 0.9).

Per row it also reports the Triton kernel launches per step (:data:`kernels.KERNEL_LAUNCHES`) and the fused ops'
executions per step (:data:`kernels.LAUNCHES`), both host-side counters: a CUDA-graph replay runs no Python, so
for those providers the counts are those of the un-replayed warm-up step (``launches_counted_on``). It also
reports the losses' share of the step: the same loss terms (CE and the distillation terms, forward and backward,
the provider's kernels and compilation) timed alone on the activations of the same batch, divided by the whole
step's time (CUDA events on a GPU, perf_counter on a CPU). With ``kd`` at batch 64 measured, a last line projects
the peer table's run (240 epochs x 50,000 images / 64 = 187,500 steps, step time only) beside mdistiller's
published ~11 ms per step (~34 minutes). Writes ``bench_distill.md`` and ``bench_distill.csv`` into ``--out``, after
every row (a run stopped by a timeout keeps the rows it finished). A way to run the step that fails is one
``error: ...`` row (``status`` column) and the others still run; the exit status is then 1.

    python launch.py recipes.bench_distill --out results/                       # on a GPU
    python launch.py recipes.bench_distill --methods ibkd_stage_b at kd --out results/
    python launch.py recipes.bench_distill --batch-sizes 8 --steps 2 --warmup 1 --rounds 1 \\
        --providers eager+reference --device cpu                                  # a CPU smoke
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

import kernels
from kd.config import ModelConfig, device_label, resolve_device
from kd.losses import hinton_kd
from kd.methods.ibkd import MBM, MBMConfig, ProjectionHead, StageBConfig, StageBParts, latent_scale, stage_b_loss
from kd.modeling import build_net
from kd.models import feature_shapes
from kd.optim import adamw, sgd
from kd.step import apply_model, call_stateless, compile_step, init_state, make_train_step, mixed_cross_entropy

from ._cli import parse

Provider = Literal["compiled+triton", "compiled+reference", "eager+triton", "eager+reference",
                   "compiled+triton+cudagraphs", "compiled+reference+cudagraphs"]
Method = Literal["ibkd_stage_b", "at", "kd"]

# The peer CIFAR-100 table run (CRD / mdistiller: resnet32x4 -> resnet8x4 Hinton KD): 240 epochs of the
# 50,000 training images at batch 64, and mdistiller's published step time for it.
PEER_EPOCHS, PEER_IMAGES, PEER_BATCH = 240, 50_000, 64
PEER_STEPS = PEER_EPOCHS * PEER_IMAGES // PEER_BATCH  # 187,500
MDISTILLER_MS_PER_STEP = 11.0
SKIPPED = "skipped: CUDA graphs need a CUDA device"


@dataclass(frozen=True)
class BenchDistillConfig:
    """What to time."""

    methods: tuple[Method, ...] = ("ibkd_stage_b", "at")
    """Train steps to time ('kd': the peer table's Hinton KD step, whose batch-64 time gives the projection)."""
    batch_sizes: tuple[int, ...] = (64, 256)
    """Images per step."""
    providers: tuple[Provider, ...] = ("compiled+triton", "compiled+reference", "eager+reference",
                                       "compiled+triton+cudagraphs", "compiled+reference+cudagraphs")
    """How the step runs: compilation, kernels backend, and '+cudagraphs' = torch.compile mode
    'reduce-overhead' (CUDA only; skipped with a note on a CPU)."""
    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """Student."""
    teachers: tuple[ModelConfig, ModelConfig] = (ModelConfig(arch="resnet32x4"), ModelConfig(arch="wrn_40_2"))
    """The two teachers (random weights): --teachers.0.arch (AT's and KD's teacher), --teachers.1.arch (IB-KD's
    second)."""
    num_classes: int = 100
    """Classes (CIFAR-100)."""
    z_dim: int = 512
    """IB latent width."""
    steps: int = 30
    """Timed steps per round."""
    warmup: int = 5
    """Untimed steps first (compilation, and CUDA-graph recording, happen here)."""
    rounds: int = 3
    """Timed rounds; the median is reported."""
    loss_share: bool = True
    """Also time the loss terms alone (same activations, provider and kernels) for the losses' share of the step."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    out: str = "reports"
    """Folder for bench_distill.md and bench_distill.csv."""


CONFIG = BenchDistillConfig()


def parse_provider(provider: str) -> tuple[bool, str, bool]:
    """``(compiled, backend, cudagraphs)`` of a provider name."""
    parts = provider.split("+")
    return parts[0] == "compiled", parts[1], len(parts) > 2 and parts[2] == "cudagraphs"


def _mode(cudagraphs: bool) -> str | None:
    return "reduce-overhead" if cudagraphs else None


def _build(cfg: BenchDistillConfig, method: str, provider: str, batch_size: int, device: torch.device) -> dict:
    """The step, its state and batch, and what the loss probe needs (the same nets, weights and batch)."""
    compiled, backend, cudagraphs = parse_provider(provider)
    torch.manual_seed(0)
    student = build_net(cfg.student, cfg.num_classes, device, seed=0)
    teachers = [build_net(m, cfg.num_classes, device, seed=i + 1, flag=f"--teachers.{i}")
                for i, m in enumerate(cfg.teachers)]
    frozen = {f"teacher{i + 1}": {"params": t.params, "buffers": t.buffers} for i, t in enumerate(teachers)}
    params, buffers = {"student": student.params}, {"student": student.buffers}
    optimizer = adamw(weight_decay=5e-4)
    lr = torch.tensor(1e-3, device=device)
    extra: dict = {}
    if method == "ibkd_stage_b":
        dims = tuple(feature_shapes(t.eval_skeleton)["pooled"][1] for t in teachers)
        mbm = MBM(MBMConfig(z_dim=cfg.z_dim), dims, cfg.num_classes).to(device).eval()
        projection = ProjectionHead(feature_shapes(student.eval_skeleton)["pooled"][1], cfg.z_dim).to(device).train()
        params["projection"] = {n: p.detach() for n, p in projection.named_parameters()}
        buffers["projection"] = {n: b.detach() for n, b in projection.named_buffers()}
        frozen["mbm"] = {n: p.detach() for n, p in mbm.named_parameters()}
        parts = StageBParts(student, projection, tuple(teachers), mbm, None, cfg.z_dim)
        loss_fn = stage_b_loss(parts, StageBConfig(), total_steps=1000, backend=backend)
        extra = {"mbm": mbm, "projection": projection}
    elif method == "at":
        from kd.methods import at as at_method
        from recipes import at

        at_cfg = dataclasses.replace(at.CONFIG, kernels=backend)
        loss_fn = at_method.make_loss(at_cfg, student, {"teacher": teachers[0]}, device, 1000).fn
        frozen = {"teacher": frozen["teacher1"]}
        extra = {"at_cfg": at_cfg}
    elif method == "kd":  # the peer table's step: Hinton KD from one teacher, SGD 0.05 momentum 0.9, wd 5e-4
        from kd.methods import kd as kd_method
        from recipes import kd_cifar

        kd_cfg = kd_cifar.CONFIG
        loss_fn = kd_method.make_loss(kd_cfg, student, {"teacher": teachers[0]}, device, 1000).fn
        frozen = {"teacher": frozen["teacher1"]}
        optimizer = sgd(kd_cfg.optim.momentum, kd_cfg.optim.weight_decay)
        lr = torch.tensor(kd_cfg.optim.lr, device=device)
        extra = {"kd_cfg": kd_cfg}
    else:
        raise ValueError(f"unknown method {method!r}")
    step = compile_step(make_train_step(loss_fn, optimizer, lambda s: lr, device_type=device.type), compiled,
                        mode=_mode(cudagraphs))
    state = init_state(params, buffers, optimizer, frozen=frozen, ema=True)
    y = torch.randint(0, cfg.num_classes, (batch_size,), device=device)
    batch = {"x": torch.randn(batch_size, 3, 32, 32, device=device), "y_a": y, "y_b": y.roll(1),
             "lam": torch.tensor(0.7, device=device)}
    return {"step": step, "state": state, "batch": batch, "student": student, "teachers": teachers, **extra}


def build_step(cfg: BenchDistillConfig, method: str, provider: str, batch_size: int, device: torch.device):
    """``(step, state, batch)`` for one method, provider and batch size."""
    built = _build(cfg, method, provider, batch_size, device)
    return built["step"], built["state"], built["batch"]


def loss_probe(cfg: BenchDistillConfig, method: str, provider: str, built: dict) -> Callable[[], None]:
    """One call = the step's loss terms (CE and the distillation terms) forward and backward, alone: the
    networks run once beforehand (no gradient) and their outputs on the step's batch are the probe's inputs;
    the gradients are taken w.r.t. the student-side outputs, as in the step."""
    compiled, backend, cudagraphs = parse_provider(provider)
    batch, state, student = built["batch"], built["state"], built["student"]
    teachers = built["teachers"]
    with torch.no_grad():
        logits, feats, _ = apply_model(student.train_skeleton, state["params"]["student"],
                                       state["buffers"]["student"], batch["x"], train=True)
        t_logits, t_feats = [], []
        for t in teachers:
            out, f, _ = apply_model(t.eval_skeleton, t.params, t.buffers, batch["x"], train=False)
            t_logits.append(out)
            t_feats.append(f)
    y_a, y_b, lam = batch["y_a"], batch["y_b"], batch["lam"]

    if method == "ibkd_stage_b":
        b = StageBConfig()
        scale = latent_scale(b.latent_norm, cfg.z_dim)
        with torch.no_grad():
            synergy, _ = call_stateless(built["mbm"], state["frozen"]["mbm"], {}, t_feats[0]["pooled"],
                                        t_feats[1]["pooled"], train=False)
            z, _ = call_stateless(built["projection"], state["params"]["projection"], state["buffers"]["projection"],
                                  feats["pooled"], train=True)
        mu, logvar, syn = synergy["mu"].float(), synergy["logvar"].float(), synergy["logits"].float()
        temperature = torch.tensor(b.kd_temperature_init, device=logits.device)
        leaves = [z.detach(), logits.detach()]

        def fn(z_s, s_logits):
            mse, ang, kd_term, ce = kernels.ib_student_loss(
                z_s, mu, logvar, kernels.precision_clamp_value(logvar), s_logits, syn, y_a, y_b, lam, temperature,
                label_smoothing=b.label_smoothing, backend=backend)
            return b.ce_alpha * ce + b.kd_alpha_init * kd_term + b.latent_alpha * (0.7 * mse + 0.3 * ang) * scale
    elif method == "at":
        at_cfg = built["at_cfg"]
        stages = list(at_cfg.stages)
        t_maps = [t_feats[0][s] for s in stages]
        leaves = [logits.detach()] + [feats[s].detach() for s in stages]

        def fn(s_logits, *s_maps):
            ce = mixed_cross_entropy(s_logits, batch, at_cfg.label_smoothing)
            return ce + at_cfg.beta * kernels.attention_transfer_loss(list(s_maps), t_maps, backend=backend)
    else:
        kd_cfg = built["kd_cfg"]
        teacher_logits = t_logits[0]
        leaves = [logits.detach()]

        def fn(s_logits):
            ce = mixed_cross_entropy(s_logits, batch, kd_cfg.label_smoothing)
            return (1 - kd_cfg.alpha) * ce + kd_cfg.alpha * hinton_kd(s_logits, teacher_logits, kd_cfg.temperature)

    leaves = [t.clone().requires_grad_(True) for t in leaves]
    loss = torch.compile(fn, fullgraph=True, dynamic=False, mode=_mode(cudagraphs)) if compiled else fn

    def call() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        torch.autograd.grad(loss(*leaves), leaves)

    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` back-to-back calls: CUDA events on a GPU, perf_counter on a CPU."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _counters() -> tuple[int, int]:
    return sum(kernels.KERNEL_LAUNCHES.values()), sum(kernels.LAUNCHES.values())


CSV_COLUMNS = ["method", "batch_size", "provider", "status", "images_per_s", "images_per_s_min", "images_per_s_max",
               "step_ms", "peak_memory_mib", "warmup_s", "triton_launches_per_step", "op_calls_per_step",
               "launches_counted_on", "loss_ms", "loss_share"]
"""bench_distill.csv's columns, in order (status: 'ok' or why the row was skipped)."""


def skipped_row(method: str, provider: str, batch_size: int) -> dict:
    nan = float("nan")
    return {"method": method, "batch_size": batch_size, "provider": provider, "status": SKIPPED,
            "images_per_s": nan, "images_per_s_min": nan, "images_per_s_max": nan, "step_ms": nan,
            "peak_memory_mib": nan, "warmup_s": nan, "triton_launches_per_step": nan, "op_calls_per_step": nan,
            "launches_counted_on": "", "loss_ms": nan, "loss_share": nan}


def measure(cfg: BenchDistillConfig, method: str, provider: str, batch_size: int, device: torch.device) -> dict:
    _, _, cudagraphs = parse_provider(provider)
    built = _build(cfg, method, provider, batch_size, device)
    step, batch = built["step"], built["batch"]
    holder = {"state": built["state"]}

    def one_step() -> None:
        if cudagraphs:  # each step is a new iteration: the previous step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        holder["state"], _ = step(holder["state"], batch)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    warmup_counts = []
    for _ in range(cfg.warmup):
        before = _counters()
        one_step()
        after = _counters()
        warmup_counts.append((after[0] - before[0], after[1] - before[1]))
    _sync(device)
    warmup_s = time.perf_counter() - start
    before = _counters()
    seconds = [time_calls(one_step, cfg.steps, device) for _ in range(cfg.rounds)]
    after = _counters()
    timed_steps = cfg.rounds * cfg.steps
    launches, ops = (after[0] - before[0]) / timed_steps, (after[1] - before[1]) / timed_steps
    counted_on = "timed steps"
    if cudagraphs and warmup_counts:
        # Replays run no Python, so the host counters see the graph's kernels only while it runs un-replayed:
        # in the first warm-up step (torch.compile runs the step once before recording the graph).
        launches, ops = warmup_counts[0]
        counted_on = "warm-up step 1 (CUDA-graph replays are not host-counted)"
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    step_s = statistics.median(seconds)
    row = {"method": method, "batch_size": batch_size, "provider": provider, "status": "ok",
           "images_per_s": batch_size / step_s, "images_per_s_min": batch_size / max(seconds),
           "images_per_s_max": batch_size / min(seconds), "step_ms": 1000 * step_s, "peak_memory_mib": peak,
           "warmup_s": warmup_s, "triton_launches_per_step": launches, "op_calls_per_step": ops,
           "launches_counted_on": counted_on, "loss_ms": float("nan"), "loss_share": float("nan")}
    if cfg.loss_share:
        # The probe's own executions are taken back out of the counters: they count the train steps only.
        saved = kernels.KERNEL_LAUNCHES.copy(), kernels.LAUNCHES.copy()
        try:
            probe = loss_probe(cfg, method, provider, built)
            for _ in range(max(1, cfg.warmup)):
                probe()
            loss_s = statistics.median(time_calls(probe, cfg.steps, device) for _ in range(cfg.rounds))
            row["loss_ms"], row["loss_share"] = 1000 * loss_s, loss_s / step_s
        except Exception as exc:  # noqa: BLE001  (a probe failure must not lose the step's row)
            print(f"{method} {provider} batch {batch_size}: loss-share probe failed "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})", flush=True)
        finally:
            for counter, copy in zip((kernels.KERNEL_LAUNCHES, kernels.LAUNCHES), saved):
                counter.clear()
                counter.update(copy)
    return row


def projection_line(rows: list[dict]) -> str:
    """The peer table run projected from the fastest measured ``kd`` step at batch 64."""
    kd_rows = [r for r in rows if r["method"] == "kd" and r["batch_size"] == PEER_BATCH and r["status"] == "ok"]
    peer = (f"mdistiller's published ~{MDISTILLER_MS_PER_STEP:.0f} ms/step = "
            f"~{PEER_STEPS * MDISTILLER_MS_PER_STEP / 1000 / 60:.0f} min")
    if not kd_rows:
        return (f"Peer CIFAR-100 table run ({PEER_EPOCHS} epochs x {PEER_IMAGES:,} images / batch {PEER_BATCH} = "
                f"{PEER_STEPS:,} steps): not projected, no kd step at batch {PEER_BATCH} was measured (add kd to "
                f"--methods and {PEER_BATCH} to --batch-sizes); {peer}.")
    best = min(kd_rows, key=lambda r: r["step_ms"])
    minutes = PEER_STEPS * best["step_ms"] / 1000 / 60
    return (f"Peer CIFAR-100 table run (resnet32x4 -> resnet8x4 Hinton KD here: {best['step_ms']:.2f} ms/step, "
            f"{best['provider']}; {PEER_EPOCHS} epochs x {PEER_IMAGES:,} images / batch {PEER_BATCH} = "
            f"{PEER_STEPS:,} steps): ~{minutes:.1f} min of train steps (no data loading or evaluation), beside "
            f"{peer}.")


def _fmt(value: float, spec: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def table(cfg: BenchDistillConfig, rows: list[dict], header: str) -> list[str]:
    """The Markdown report: the header, one line per row, the notes and the projection line."""
    lines = [header, "",
             "| method | batch | provider | images/s | min..max | ms/step | peak memory (MiB) | Triton launches/step "
             "| op calls/step | loss ms | loss share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['provider']} | {r['status']} | | | | | | | |")
            continue
        mark = "*" if r["launches_counted_on"] != "timed steps" else ""
        share = "-" if math.isnan(r["loss_share"]) else f"{100 * r['loss_share']:.1f}%"
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['provider']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_min']:.1f}..{r['images_per_s_max']:.1f} | {r['step_ms']:.2f} | "
                     f"{_fmt(r['peak_memory_mib'], '.0f')} | {r['triton_launches_per_step']:g}{mark} | "
                     f"{r['op_calls_per_step']:g}{mark} | {_fmt(r['loss_ms'], '.2f')} | {share} |")
    lines += ["", "Triton launches/step: kernels.KERNEL_LAUNCHES per step; op calls/step: kernels.LAUNCHES (fused-op "
              "executions, forward and backward). * counted in the first warm-up step: CUDA-graph replays run no "
              "Python. Loss share: the loss terms alone (forward + backward on the step's activations) / the step.",
              "", projection_line(rows)]
    return lines


def write_outputs(cfg: BenchDistillConfig, rows: list[dict], header: str) -> list[str]:
    """(Re)write bench_distill.md and .csv with the rows so far: a run stopped by a timeout keeps its rows."""
    lines = table(cfg, rows, header)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.md").write_text("\n".join(lines) + "\n")
    with open(out / "bench_distill.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return lines


def run(cfg: BenchDistillConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    header = (f"{device_label(device)}, torch {torch.__version__}, triton {triton_version}, "
              f"{time.strftime('%Y-%m-%d')}; student {cfg.student.arch}, teachers {cfg.teachers[0].arch} + "
              f"{cfg.teachers[1].arch}, AdamW (kd: SGD), median of {cfg.rounds} rounds x {cfg.steps} steps after "
              f"{cfg.warmup} warm-up steps")
    rows: list[dict] = []
    for method in cfg.methods:
        for batch_size in cfg.batch_sizes:
            for provider in cfg.providers:
                if parse_provider(provider)[2] and device.type != "cuda":
                    print(f"{method:13s} batch {batch_size:4d}  {provider:30s} {SKIPPED} (this run is on "
                          f"{device.type})", flush=True)
                    rows.append(skipped_row(method, batch_size=batch_size, provider=provider))
                else:
                    try:
                        row = measure(cfg, method, provider, batch_size, device)
                    except Exception as exc:  # noqa: BLE001  (one failing way to run the step must not lose the others)
                        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                        row = {**skipped_row(method, provider, batch_size),
                               "status": f"error: {type(exc).__name__}: {message}".replace("|", "/")}
                        print(f"{method:13s} batch {batch_size:4d}  {provider:30s} {row['status']}", flush=True)
                        rows.append(row)
                        lines = write_outputs(cfg, rows, header)
                        continue
                    print(f"{method:13s} batch {batch_size:4d}  {provider:30s} {row['images_per_s']:9.1f} images/s  "
                          f"{row['step_ms']:8.2f} ms/step  peak {row['peak_memory_mib']:.0f} MiB  "
                          f"{row['triton_launches_per_step']:g} Triton launches/step  "
                          f"loss share {_fmt(100 * row['loss_share'], '.1f')}"
                          f"{'' if math.isnan(row['loss_share']) else '%'}", flush=True)
                    rows.append(row)
                lines = write_outputs(cfg, rows, header)
    if not rows:
        lines = write_outputs(cfg, rows, header)
    print("\n" + "\n".join(lines))
    return rows


def main(argv=None, prog="launch.py recipes.bench_distill"):
    rows = run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 1 if any(r["status"].startswith("error") for r in rows) else 0  # every row is written either way
