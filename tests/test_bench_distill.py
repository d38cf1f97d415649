"""The step benchmark (recipes.bench_distill), the pipeline smoke (recipes.smoke_pipeline) and the GPU script that
runs them, on a CPU at tiny sizes through the real command line (``python launch.py recipes.NAME ...``)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]
TINY_NETS = ["--student.arch", "resnet8", "--teachers.0.arch", "resnet8", "--teachers.1.arch", "resnet8"]
BENCH_COLUMNS = ["method", "batch_size", "provider", "status", "images_per_s", "images_per_s_min", "images_per_s_max",
                 "step_ms", "peak_memory_mib", "warmup_s", "triton_launches_per_step", "op_calls_per_step",
                 "launches_counted_on", "loss_ms", "loss_share"]
SMOKE_PARTS = ["teacher1 fine-tuning", "teacher1 evaluation", "teacher2 fine-tuning", "teacher2 evaluation",
               "feature cache", "stage A", "stage B", "student evaluation"]


def launch(recipe: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python launch.py recipes.<recipe> ...`` from the repository root; the loss kernels as the recipe picks
    them (KD_KERNELS unset), the Triton interpreter on a machine without CUDA, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k != "KD_KERNELS"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "launch.py", f"recipes.{recipe}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def expected_triton_launches_per_step(method: str) -> int:
    """What kernels.KERNEL_LAUNCHES counts for one eager+triton step of the same tiny benchmark, in this process."""
    from recipes import bench_distill
    from kd.config import ModelConfig

    cfg = bench_distill.BenchDistillConfig(student=ModelConfig(arch="resnet8"),
                                           teachers=(ModelConfig(arch="resnet8"), ModelConfig(arch="resnet8")),
                                           num_classes=10, z_dim=16)
    step, state, batch = bench_distill.build_step(cfg, method, "eager+triton", 4, torch.device("cpu"))
    before = sum(kernels.KERNEL_LAUNCHES.values())
    step(state, batch)
    return sum(kernels.KERNEL_LAUNCHES.values()) - before


def test_bench_distill_cli_rows_columns_launches_and_skipped_cudagraphs(tmp_path):
    providers = ["eager+reference", "eager+triton", "compiled+triton+cudagraphs"]
    proc = launch("bench_distill", "--methods", "ibkd_stage_b", "kd", "--batch-sizes", "8", "--steps", "1",
                  "--warmup", "1", "--rounds", "1", "--providers", *providers, *TINY_NETS, "--num-classes", "10",
                  "--z-dim", "16", "--device", "cpu", "--out", str(tmp_path))
    columns, rows = read_csv(tmp_path / "bench_distill.csv")
    assert columns == BENCH_COLUMNS
    assert [(r["method"], r["provider"]) for r in rows] == [(m, p) for m in ("ibkd_stage_b", "kd") for p in providers]
    by = {(r["method"], r["provider"]): r for r in rows}

    # CUDA graphs on a CPU: one note, a skipped row, no error
    for method in ("ibkd_stage_b", "kd"):
        row = by[(method, "compiled+triton+cudagraphs")]
        assert row["status"].startswith("skipped") and "CUDA" in row["status"]
        assert row["images_per_s"] == "nan"
    assert proc.stdout.count("compiled+triton+cudagraphs") >= 2
    assert "skipped: CUDA graphs need a CUDA device" in proc.stdout

    for (method, provider), row in by.items():
        if "cudagraphs" in provider:
            continue
        assert row["status"] == "ok", (method, provider, row["status"])
        ips, step_ms = float(row["images_per_s"]), float(row["step_ms"])
        assert ips > 0 and float(row["images_per_s_min"]) <= ips <= float(row["images_per_s_max"])
        assert step_ms == pytest.approx(1000 * 8 / ips, rel=1e-6)
        assert row["launches_counted_on"] == "timed steps"
        loss_ms = float(row["loss_ms"])
        assert 0 < loss_ms and float(row["loss_share"]) == pytest.approx(loss_ms / step_ms, rel=1e-6)

    # Triton launches per step: none for the references and for Hinton KD (no fused kernel); for IB-KD's eager+triton
    # step what kernels.KERNEL_LAUNCHES counts for such a step (the fused student loss: one forward, one backward)
    assert float(by[("ibkd_stage_b", "eager+reference")]["triton_launches_per_step"]) == 0
    assert float(by[("ibkd_stage_b", "eager+reference")]["op_calls_per_step"]) == 0
    assert float(by[("kd", "eager+triton")]["triton_launches_per_step"]) == 0
    expected = expected_triton_launches_per_step("ibkd_stage_b")
    assert expected == 2
    assert float(by[("ibkd_stage_b", "eager+triton")]["triton_launches_per_step"]) == expected
    assert float(by[("ibkd_stage_b", "eager+triton")]["op_calls_per_step"]) == 2

    md = (tmp_path / "bench_distill.md").read_text()
    assert "| method | batch | provider | images/s | min..max | ms/step | peak memory (MiB) | Triton launches/step " \
           "| op calls/step | loss ms | loss share |" in md
    for method, provider in by:
        assert f"| {method} | 8 | {provider} |" in md
    assert "not projected" in md and "~11 ms/step = ~34 min" in md  # no kd step at batch 64 here


def test_bench_distill_projects_the_peer_table_run_from_kd_at_batch_64(tmp_path):
    launch("bench_distill", "--methods", "kd", "--batch-sizes", "64", "--steps", "1", "--warmup", "1", "--rounds", "1",
           "--providers", "eager+reference", "--loss-share", "False", *TINY_NETS, "--num-classes", "10",
           "--device", "cpu", "--out", str(tmp_path))
    _, rows = read_csv(tmp_path / "bench_distill.csv")
    assert len(rows) == 1 and rows[0]["loss_share"] == "nan"
    minutes = 187_500 * float(rows[0]["step_ms"]) / 1000 / 60
    line = (tmp_path / "bench_distill.md").read_text().strip().splitlines()[-1]
    assert line.startswith("Peer CIFAR-100 table run")
    assert f"{float(rows[0]['step_ms']):.2f} ms/step" in line and f"~{minutes:.1f} min of train steps" in line
    assert "187,500 steps" in line and "mdistiller's published ~11 ms/step = ~34 min" in line


def test_projection_line_uses_the_fastest_kd_step_at_batch_64():
    from recipes.bench_distill import projection_line

    rows = [{"method": "kd", "batch_size": 64, "provider": "a", "status": "ok", "step_ms": 20.0},
            {"method": "kd", "batch_size": 64, "provider": "b", "status": "ok", "step_ms": 8.0},
            {"method": "kd", "batch_size": 256, "provider": "c", "status": "ok", "step_ms": 1.0},
            {"method": "at", "batch_size": 64, "provider": "d", "status": "ok", "step_ms": 2.0}]
    line = projection_line(rows)
    assert "8.00 ms/step, b" in line and "~25.0 min" in line  # 187,500 x 8 ms = 25 min


def test_smoke_pipeline_cli_reports_every_part_and_projects_the_run(tmp_path):
    launch("smoke_pipeline", *TINY_NETS, "--steps", "2", "--warmup", "1", "--data.batch-size", "8",
           "--stage-a-batch-size", "16", "--data.eval-batch-size", "16", "--device", "cpu", "--out", str(tmp_path))
    md = (tmp_path / "smoke_pipeline.md").read_text()
    assert "synthetic (procedural, 100 classes)" in md and "amp none, compile off" in md
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in SMOKE_PARTS:
            rows[cells[0]] = cells
    assert list(rows) == SMOKE_PARTS
    full_images = {"teacher1 fine-tuning": 30 * 45_000, "teacher2 fine-tuning": 30 * 45_000,
                   "teacher1 evaluation": 30 * 5_000 + 10_000, "feature cache": 60_000,
                   "stage A": 20 * (45_000 // 16 * 16), "stage B": 90 * 45_000,
                   "student evaluation": 2 * (90 * 5_000 + 10_000)}
    total = 0.0
    for part, (_, batch, rate, warm, images, minutes, _) in rows.items():
        rate, images, minutes = float(rate), int(images.replace(",", "")), float(minutes)
        assert rate > 0 and float(warm) >= 0
        if part in full_images:
            assert images == full_images[part], part
        assert minutes == pytest.approx(images / rate / 60, abs=0.06, rel=1e-3)
        total += minutes
    summary = [line for line in md.splitlines() if line.startswith("Projected full CIFAR-100 IB-KD run")]
    assert len(summary) == 1
    assert abs(float(re.search(r"~(\d+) min", summary[0]).group(1)) - total) <= 1


def test_gpu_script_parses_and_runs_its_parts_in_order():
    script = ROOT / "kernels" / "bench_gpu.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    body = text[text.index("set -uo pipefail"):]
    parts = ("python -m pytest tests/", "python -m kernels.bench --out", "python launch.py recipes.bench_distill",
             "python launch.py recipes.smoke_pipeline")
    order = [body.index(s) for s in parts]
    assert order == sorted(order)
    assert 'timeout "${SMOKE_TIMEOUT:-0}" python launch.py recipes.smoke_pipeline' in body
    step_args = re.search(r"STEP_BENCH_ARGS=\$\{STEP_BENCH_ARGS:-(.*?)\}\n", body, re.S).group(1)
    assert "--batch-sizes 64 256" in step_args and "kd" in step_args
    for provider in ("compiled+triton+cudagraphs", "compiled+reference+cudagraphs"):
        assert provider in step_args
    assert '[ "$smoke_rc" -eq 0 ]' in body
