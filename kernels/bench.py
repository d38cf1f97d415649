"""Benchmark harness for the fused kernels: ``python -m kernels.bench [--quick] [--out DIR]``.

Providers: ``eager`` (the reference in :mod:`kernels.reference`), ``compile`` (``torch.compile`` of
that reference, fullgraph) and ``triton`` (the fused kernels; CUDA only: the interpreter is a
correctness tool, not something to time). Modes: ``forward`` (no autograd graph), ``backward``
(the backward alone: each repetition builds a fresh graph untimed, then times its backward) and
``full`` (forward + backward).

Every provider first passes a correctness gate against the eager reference (values and gradients,
one ``full`` call); a provider that fails is reported as such and not timed. Timings are per call,
median and p20/p80 over repetitions (CUDA events on a GPU, ``perf_counter`` on CPU). Bandwidth is
*modelled*: the bytes the op must move at minimum (inputs read once, gradients written once; the
``MB`` column), divided by the median time, and compared with two baselines that move the same
number of bytes, measured the same way: a device-to-device copy (half read, half written) and a
read-only ``sum`` (every byte read once; the roofline of a forward that only reads). Peak-memory
delta (CUDA only) is the allocator's peak during one call minus what was allocated before it.

On CUDA each measurement has two times (both with the L2 cache flushed before every repetition by
zeroing a buffer larger than it, untimed, and >= 100 repetitions):

* ``median ms`` -- host-inclusive: events around the eager call, so Python, dispatch and launch
  overhead count wherever they leave the GPU idle;
* ``graph ms`` -- the same call captured once in a CUDA graph and replayed: GPU time without host
  overhead. The backward mode captures the backward alone (``retain_graph=True`` over one recorded
  forward). A provider that cannot be captured (a host sync, a compiled backward that frees its
  buffers) gets an empty cell and the reason in ``graph_note`` (CSV).

``launches`` is the number of Triton launches of the project's kernels in one call
(:data:`kernels.KERNEL_LAUNCHES`; empty for the eager and compiled references, whose kernels are
torch's and Inductor's). On CPU neither the graph time nor the flush exist; the CPU mode is unchanged.

Output: a Markdown table on stdout; with ``--out DIR`` also ``DIR/bench.csv`` (one row per
measurement, with device, torch/triton versions and date) and ``DIR/bench.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import at, ib, reference
from ._dispatch import HAS_TRITON, KERNEL_LAUNCHES

PROVIDERS = ("eager", "compile", "triton")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Problems: inputs, the three implementations, modelled bytes
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One benchmark case, built on a device in a dtype."""

    leaves: list[torch.Tensor]  # tensors that receive gradients
    call: dict[str, Callable[[], tuple[torch.Tensor, ...]]]  # provider -> forward thunk
    grad_outputs: list[torch.Tensor]  # one per forward output
    bytes_by_mode: dict[str, int]


@dataclass(frozen=True)
class Case:
    op: str  # "at" | "ib_student" | "ib_reparam"
    name: str
    shape: str
    build: Callable[[torch.device, torch.dtype, Sequence[str]], Problem] = field(compare=False)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compiled(fn):
    # A fresh compile per case: shapes differ between cases, and each should get its own graph. Dynamo
    # caches per code object, so without a reset the cases (x dtypes) of one op exhaust its recompile
    # limit (8) and fullgraph=True turns that into an error (seen on an H200 at the 9th AT case).
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _implementations(reference_fn, public_fn, providers):
    impls = {"eager": reference_fn}
    if "compile" in providers:
        impls["compile"] = _compiled(reference_fn)
    if "triton" in providers:
        impls["triton"] = functools.partial(public_fn, backend="triton")
    return impls


def _at_case(name, student_shapes, teacher_shapes, channels_last=False) -> Case:
    shape = " + ".join(f"{tuple(s)}->{tuple(t)}" for s, t in zip(student_shapes, teacher_shapes))
    if channels_last:
        shape += " NHWC"

    def build(device, dtype, providers):
        generator = torch.Generator(device="cpu").manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format

        def make(shape_):
            t = torch.randn(shape_, generator=generator, dtype=torch.float32).to(device, dtype)
            return t.contiguous(memory_format=memory_format)

        students = [make(s).requires_grad_(True) for s in student_shapes]
        teachers = [make(t) for t in teacher_shapes]
        weights = [1000.0] * len(students)
        impls = _implementations(reference.attention_transfer_loss, at.attention_transfer_loss, providers)
        call = {p: (lambda fn=fn: (fn(students, teachers, weights),)) for p, fn in impls.items()}
        forward_bytes = _nbytes(*students, *teachers)  # read every map once
        backward_bytes = 2 * _nbytes(*students)  # read the student maps, write their gradients
        return Problem(
            leaves=students,
            call=call,
            grad_outputs=[torch.ones((), device=device, dtype=torch.float32)],
            bytes_by_mode={"forward": forward_bytes, "backward": backward_bytes, "full": forward_bytes + backward_bytes},
        )

    return Case("at", name, shape, build)


def _ib_student_case(name, rows, latent_dim, classes) -> Case:
    def build(device, dtype, providers):
        generator = torch.Generator(device="cpu").manual_seed(0)

        def randn(*shape):
            return torch.randn(shape, generator=generator).to(device, dtype)

        z_s = torch.nn.functional.normalize(randn(rows, latent_dim).float(), dim=1).to(dtype).requires_grad_(True)
        mu, logvar = randn(rows, latent_dim), randn(rows, latent_dim).clamp(-6, 2)
        student = (3 * randn(rows, classes)).requires_grad_(True)
        synergy = 3 * randn(rows, classes)
        target_a = torch.randint(0, classes, (rows,), generator=generator).to(device)
        target_b = torch.randint(0, classes, (rows,), generator=generator).to(device)
        precision_max = reference.precision_clamp_value(logvar)
        lam = torch.tensor(0.3, device=device)
        temperature = torch.tensor(4.0, device=device)
        args = (z_s, mu, logvar, precision_max, student, synergy, target_a, target_b, lam, temperature)
        impls = _implementations(
            functools.partial(reference.ib_student_loss, label_smoothing=0.05),
            functools.partial(ib.ib_student_loss, label_smoothing=0.05),
            providers,
        )
        call = {p: (lambda fn=fn: tuple(fn(*args))) for p, fn in impls.items()}
        latent, logits = _nbytes(z_s, mu, logvar), _nbytes(student, synergy)
        forward_bytes = latent + logits + _nbytes(target_a, target_b)
        # The gradients: read what they depend on (latent + logits), write d z_s and d logits.
        backward_bytes = latent + logits + _nbytes(z_s, student)
        grad_outputs = [torch.tensor(g, device=device) for g in (0.7 / latent_dim, 0.3 / latent_dim, 0.5, 1.0)]
        return Problem(
            leaves=[z_s, student],
            call=call,
            grad_outputs=grad_outputs,
            bytes_by_mode={"forward": forward_bytes, "backward": backward_bytes, "full": forward_bytes + backward_bytes},
        )

    return Case("ib_student", name, f"N={rows} Z={latent_dim} K={classes}", build)


def _ib_reparam_case(name, rows, latent_dim) -> Case:
    def build(device, dtype, providers):
        generator = torch.Generator(device="cpu").manual_seed(0)
        mu = torch.randn(rows, latent_dim, generator=generator).to(device, dtype).requires_grad_(True)
        logvar = torch.randn(rows, latent_dim, generator=generator).clamp(-6, 2).to(device, dtype).requires_grad_(True)
        eps = torch.randn(rows, latent_dim, generator=generator).to(device, dtype)
        impls = _implementations(reference.ib_reparam_kl, ib.ib_reparam_kl, providers)
        call = {p: (lambda fn=fn: tuple(fn(mu, logvar, eps))) for p, fn in impls.items()}
        grad_z = torch.randn(rows, latent_dim, generator=generator).to(device, dtype)
        grad_kl = torch.full((rows,), 1e-3, device=device)
        forward_bytes = _nbytes(mu, logvar, eps) + _nbytes(mu) + rows * 4  # read 3, write z and kl
        backward_bytes = _nbytes(mu, logvar, eps, grad_z, grad_kl) + 2 * _nbytes(mu)
        return Problem(
            leaves=[mu, logvar],
            call=call,
            grad_outputs=[grad_z, grad_kl],
            bytes_by_mode={"forward": forward_bytes, "backward": backward_bytes, "full": forward_bytes + backward_bytes},
        )

    return Case("ib_reparam", name, f"N={rows} Z={latent_dim}", build)


def _cifar_at_pairs():
    # resnet8x4-like student stages vs a wide teacher (resnet152 small-input: 256/512/1024/2048 ch)
    return (
        [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)],
        [(128, 256, 32, 32), (128, 512, 16, 16), (128, 1024, 8, 8)],
    )


def full_cases() -> list[Case]:
    cifar_students, cifar_teachers = _cifar_at_pairs()
    cases = [
        _at_case("cifar stage1", [cifar_students[0]], [cifar_teachers[0]]),
        _at_case("cifar stage2", [cifar_students[1]], [cifar_teachers[1]]),
        _at_case("cifar stage3", [cifar_students[2]], [cifar_teachers[2]]),
        _at_case("cifar pooled 8->4", [(128, 256, 8, 8)], [(128, 2048, 4, 4)]),
        _at_case("cifar 3 pairs", cifar_students, cifar_teachers),
        _at_case("imagenet stage1", [(64, 256, 56, 56)], [(64, 256, 56, 56)]),  # 205 MB fp32 each
        _at_case("imagenet stage2", [(64, 512, 28, 28)], [(64, 512, 28, 28)]),  # 103 MB fp32 each
        _at_case("imagenet stage1", [(64, 256, 56, 56)], [(64, 256, 56, 56)], channels_last=True),
        _at_case("imagenet pooled 56->28", [(64, 256, 56, 56)], [(64, 512, 28, 28)]),
        # small maps, wide teacher: N x P alone gives few programs (the channel split's case)
        _at_case("8x8 wide teacher", [(64, 256, 8, 8)], [(64, 2048, 8, 8)]),
        _at_case("32x32 N256", [(256, 256, 32, 32)], [(256, 256, 32, 32)]),  # 268 MB fp32 each
        _ib_student_case("cifar100 (target)", 128, 512, 100),
        _ib_student_case("small", 128, 128, 10),
        _ib_student_case("large batch", 1024, 512, 100),
        _ib_student_case("imagenet", 1024, 1024, 1000),
        _ib_student_case("max", 8192, 1024, 1000),
        _ib_reparam_case("cifar100", 128, 512),
        _ib_reparam_case("large", 8192, 1024),
    ]
    return cases


def quick_cases() -> list[Case]:
    return [
        _at_case("small", [(8, 16, 16, 16)], [(8, 32, 16, 16)]),
        _at_case("small pooled 16->8", [(8, 32, 16, 16)], [(8, 64, 8, 8)]),
        _ib_student_case("cifar100 (target)", 128, 512, 100),
        _ib_reparam_case("cifar100", 128, 512),
    ]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CUDA_MIN_REPS = 100  # repetitions per CUDA measurement, at least
_L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100/H200: 50 MB)
_flush_buffers: dict[str, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Evict the L2 cache (CUDA only): zero a buffer larger than it. Call it outside the timed region."""
    if device.type != "cuda":
        return
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    _flush_buffers[key].zero_()


def _time_calls(
    fn: Callable[[object], object],
    device: torch.device,
    budget_s: float,
    min_reps: int,
    max_reps: int,
    setup: Callable[[], object] = lambda: None,
) -> list[float]:
    """Per-call times of ``fn(setup())`` in ms, ``setup`` untimed; repetitions fill about ``budget_s``.

    On CUDA at least :data:`CUDA_MIN_REPS` repetitions, each after an (untimed) L2 flush.
    """
    if device.type == "cuda":
        min_reps = max(min_reps, CUDA_MIN_REPS)
        max_reps = max(max_reps, min_reps)
    for _ in range(3):
        fn(setup())
    _synchronize(device)
    state = setup()
    _synchronize(device)
    start = time.perf_counter()
    fn(state)
    _synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    del state
    reps = int(min(max_reps, max(min_reps, budget_s / estimate)))
    times = []
    if device.type == "cuda":
        # Events are recorded in stream order, so the untimed setup's kernels finish before `begin`.
        for _ in range(reps):
            state = setup()
            _flush_l2(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
            del state
    else:
        for _ in range(reps):
            state = setup()
            begin = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - begin) * 1e3)
            del state
    return times


def _graph_times(
    fn: Callable[[object], object], setup: Callable[[], object], device: torch.device, reps: int
) -> tuple[list[float] | None, str]:
    """Per-replay times (ms) of ``fn(setup())`` captured once in a CUDA graph, L2 flushed before each
    replay; ``(None, reason)`` off CUDA or when the call cannot be captured."""
    if device.type != "cuda":
        return None, "no CUDA"
    try:
        state = setup()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
            for _ in range(2):
                fn(state)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(state)
        torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - any capture failure is reported, not fatal
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - a failed capture may leave an error behind; report the first
            pass
        return None, f"not capturable: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    times = []
    for _ in range(max(reps, CUDA_MIN_REPS)):
        _flush_l2(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    del graph, state
    return times, ""


def _launches_per_call(fn: Callable[[object], object], setup: Callable[[], object]) -> int:
    """Triton launches of the project's kernels in one ``fn(setup())`` (setup not counted)."""
    state = setup()
    before = KERNEL_LAUNCHES.copy()
    fn(state)
    return sum((KERNEL_LAUNCHES - before).values())


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


_copy_cache: dict[tuple[str, int], float] = {}
_sum_cache: dict[tuple[str, int], float] = {}


def _copy_ms(device: torch.device, moved_bytes: int, budget_s: float) -> float:
    """Median time of a device-to-device copy that moves ``moved_bytes`` (half read, half written)."""
    key = (str(device), moved_bytes)
    if key not in _copy_cache:
        source = torch.empty(max(moved_bytes // 2, 1), dtype=torch.uint8, device=device)
        destination = torch.empty_like(source)
        times = _time_calls(lambda _: destination.copy_(source), device, budget_s, 5, 1000)
        _copy_cache[key] = statistics.median(times)
        del source, destination
    return _copy_cache[key]


def _sum_ms(device: torch.device, moved_bytes: int, budget_s: float) -> float:
    """Median time of a read-only ``sum`` over ``moved_bytes`` of fp32 (every byte read once)."""
    key = (str(device), moved_bytes)
    if key not in _sum_cache:
        source = torch.ones(max(moved_bytes // 4, 1), dtype=torch.float32, device=device)
        times = _time_calls(lambda _: source.sum(), device, budget_s, 5, 1000)
        _sum_cache[key] = statistics.median(times)
        del source
    return _sum_cache[key]


def _peak_delta_mb(fn, setup, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    state = setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result, state
    return (peak - before) / 2**20


# ----------------------------------------------------------------------------------------------
# Correctness gate
# ----------------------------------------------------------------------------------------------


def _forward_and_grads(problem: Problem, provider: str):
    outputs = problem.call[provider]()
    grads = torch.autograd.grad(outputs, problem.leaves, problem.grad_outputs, allow_unused=True)
    return [o.detach().float() for o in outputs], [g.float() if g is not None else None for g in grads]


def _gate(problem: Problem, provider: str, dtype: torch.dtype) -> tuple[bool, float]:
    """Compare values and gradients with the eager reference; returns (ok, worst relative error)."""
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    expected_out, expected_grads = _forward_and_grads(problem, "eager")
    got_out, got_grads = _forward_and_grads(problem, provider)
    worst = 0.0
    for got, expected in zip(got_out + got_grads, expected_out + expected_grads):
        if (got is None) != (expected is None):
            return False, math.inf
        if got is None:
            continue
        scale = expected.abs().max().clamp_min(1e-30)
        error = ((got - expected).abs().max() / scale).item()
        if not math.isfinite(error):
            return False, math.inf
        worst = max(worst, error)
    return worst <= tolerance, worst


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    case: str
    shape: str
    dtype: str
    mode: str
    provider: str
    check: str
    max_rel_err: float
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    modelled_bytes: int = 0
    mb_moved: float | None = None  # modelled bytes / 1e6
    gbps: float | None = None
    copy_gbps: float | None = None
    pct_of_copy: float | None = None
    sum_gbps: float | None = None  # the read-only baseline
    pct_of_sum: float | None = None
    speedup_vs_eager: float | None = None
    peak_mem_delta_mb: float | None = None
    graph_median_ms: float | None = None  # CUDA-graph replay (CUDA only)
    graph_p20_ms: float | None = None
    graph_p80_ms: float | None = None
    graph_gbps: float | None = None
    graph_note: str = ""
    launches_per_call: int | None = None  # Triton launches of the project's kernels (triton provider)


def _mode_thunk(problem: Problem, provider: str, mode: str, retain_graph: bool = False):
    """(setup, fn) for one mode: ``fn(setup())`` is what gets timed, ``setup`` is not.

    ``retain_graph``: the backward keeps its autograd graph, so one recorded forward can be
    differentiated again (what a CUDA-graph capture of the backward alone needs).
    """
    forward = problem.call[provider]
    leaves, grad_outputs = problem.leaves, problem.grad_outputs
    if mode == "forward":

        def run_forward(_):
            with torch.no_grad():
                return forward()

        return (lambda: None), run_forward
    if mode == "full":
        return (lambda: None), (lambda _: torch.autograd.grad(forward(), leaves, grad_outputs, allow_unused=True))
    # backward: a fresh graph per call (untimed), then only its backward is timed. Compiled
    # backwards donate their buffers, so one graph cannot be replayed with retain_graph.
    return forward, (
        lambda outputs: torch.autograd.grad(outputs, leaves, grad_outputs, allow_unused=True, retain_graph=retain_graph)
    )


def run(
    cases: Sequence[Case],
    providers: Sequence[str],
    modes: Sequence[str],
    dtypes: Sequence[str],
    device: torch.device,
    budget_s: float,
    log=print,
    cudagraph: bool = True,
) -> list[Row]:
    rows: list[Row] = []
    for case in cases:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            try:
                problem = case.build(device, dtype, providers)
            except torch.OutOfMemoryError:  # pragma: no cover - GPU only
                log(f"  skipped {case.op} {case.name} {dtype_name}: out of memory")
                continue
            eager_ms: dict[str, float] = {}
            for provider in providers:
                ok, error = _gate(problem, provider, dtype) if provider != "eager" else (True, 0.0)
                for mode in modes:
                    row = Row(case.op, case.name, case.shape, dtype_name, mode, provider, "ok" if ok else "FAIL", error)
                    rows.append(row)
                    if not ok:
                        continue
                    setup, thunk = _mode_thunk(problem, provider, mode)
                    times = _time_calls(thunk, device, budget_s, min_reps=5, max_reps=500, setup=setup)
                    row.median_ms = statistics.median(times)
                    row.p20_ms, row.p80_ms = _quantile(times, 0.2), _quantile(times, 0.8)
                    row.modelled_bytes = problem.bytes_by_mode[mode]
                    row.mb_moved = row.modelled_bytes / 1e6
                    row.gbps = row.modelled_bytes / (row.median_ms * 1e-3) / 1e9
                    copy_ms = _copy_ms(device, row.modelled_bytes, budget_s / 2)
                    row.copy_gbps = row.modelled_bytes / (copy_ms * 1e-3) / 1e9
                    row.pct_of_copy = 100.0 * row.gbps / row.copy_gbps
                    sum_ms = _sum_ms(device, row.modelled_bytes, budget_s / 2)
                    row.sum_gbps = row.modelled_bytes / (sum_ms * 1e-3) / 1e9
                    row.pct_of_sum = 100.0 * row.gbps / row.sum_gbps
                    row.peak_mem_delta_mb = _peak_delta_mb(thunk, setup, device)
                    if provider == "triton":
                        row.launches_per_call = _launches_per_call(thunk, setup)
                    if cudagraph and device.type == "cuda":
                        graph_setup, graph_thunk = _mode_thunk(problem, provider, mode, retain_graph=True)
                        graph_times, row.graph_note = _graph_times(graph_thunk, graph_setup, device, len(times))
                        if graph_times:
                            row.graph_median_ms = statistics.median(graph_times)
                            row.graph_p20_ms, row.graph_p80_ms = _quantile(graph_times, 0.2), _quantile(graph_times, 0.8)
                            row.graph_gbps = row.modelled_bytes / (row.graph_median_ms * 1e-3) / 1e9
                        del graph_setup, graph_thunk
                    if provider == "eager":
                        eager_ms[mode] = row.median_ms
                    if mode in eager_ms:
                        row.speedup_vs_eager = eager_ms[mode] / row.median_ms
                    del setup, thunk
                    graph = f" graph {row.graph_median_ms:9.3f} ms" if row.graph_median_ms is not None else ""
                    log(f"  {case.op:10s} {case.name:24s} {dtype_name} {mode:8s} {provider:7s} {row.median_ms:9.3f} ms{graph}  check {row.check}")
            del problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Row]) -> str:
    header = (
        "| op | case | shape | dtype | mode | provider | median ms | p20 ms | p80 ms | graph ms | MB | GB/s (modelled) "
        "| graph GB/s | % of copy | % of sum | launches | x eager | peak MB | check |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.case} | {r.shape} | {r.dtype} | {r.mode} | {r.provider} | {_fmt(r.median_ms, '.3f')} | "
            f"{_fmt(r.p20_ms, '.3f')} | {_fmt(r.p80_ms, '.3f')} | {_fmt(r.graph_median_ms, '.3f')} | {_fmt(r.mb_moved, '.2f')} | "
            f"{_fmt(r.gbps, '.1f')} | {_fmt(r.graph_gbps, '.1f')} | {_fmt(r.pct_of_copy, '.0f')} | {_fmt(r.pct_of_sum, '.0f')} | "
            f"{_fmt(r.launches_per_call, 'd')} | {_fmt(r.speedup_vs_eager, '.2f')} | {_fmt(r.peak_mem_delta_mb, '.1f')} | "
            f"{r.check} ({r.max_rel_err:.1e}) |"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"
    triton_version = "not installed"
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def write_csv(path: str, rows: Sequence[Row], env: dict[str, str]) -> None:
    fields = list(env) + list(Row.__dataclass_fields__)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row.__dict__})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a CPU run takes well under 2 minutes)")
    parser.add_argument("--out", metavar="DIR", help="write bench.csv and bench.md into DIR")
    parser.add_argument("--ops", default="at,ib_student,ib_reparam", help="comma list of: at, ib_student, ib_reparam")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of: eager, compile, triton")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of: forward, backward, full")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default: fp32,bf16 on CUDA; fp32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    parser.add_argument("--no-cudagraph", action="store_true", help="skip the CUDA-graph replay timings (CUDA only)")
    parser.add_argument(
        "--cpu-threads", type=int, default=1,
        help="torch threads for a CPU run (default 1: on a shared CPU, OpenMP barrier waits behind other "
        "processes turn multi-threaded timings into ms-scale outliers)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads)
    providers = [p for p in args.providers.split(",") if p]
    if device.type != "cuda" and "triton" in providers:
        providers.remove("triton")
        print("triton provider skipped: no CUDA device here (the Triton interpreter is for correctness, not timing)")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}")
    modes = [m for m in args.modes.split(",") if m]
    dtypes = (args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    ops = set(args.ops.split(","))
    cases = [c for c in (quick_cases() if args.quick else full_cases()) if c.op in ops]
    budget_s = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)

    env = environment(device)
    print(f"kernels.bench on {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}", flush=True)
    rows = run(cases, providers, modes, dtypes, device, budget_s, log=lambda line: print(line, file=sys.stderr, flush=True),
               cudagraph=not args.no_cudagraph)
    table = markdown_table(rows)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "bench.csv"), rows, env)
        with open(os.path.join(args.out, "bench.md"), "w") as handle:
            handle.write(f"kernels.bench on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}\n\n{table}\n")
    failed = [r for r in rows if r.check != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
