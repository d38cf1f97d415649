"""Benchmark the fused AT / IB kernels against eager and torch.compile references (same as python -m kernels.bench)."""

from __future__ import annotations


def main(argv=None, prog="launch.py recipes.kernels_bench"):
    from kernels.bench import main as bench_main

    return bench_main(list(argv or []))
