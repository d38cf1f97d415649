"""Compare methods like for like: ce, kd, at, fitnet and ibkd students, several seeds, one table and plot.

Every method gets the same data, student, budget, optimizer and augmentation; the two teachers are
fine-tuned once (or reused from their checkpoints) and shared. The single-teacher baselines distil from
``--single-teacher`` (teacher1 by default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from kd.config import ModelConfig, RunConfig
from kd.run import say

from . import at, ce, fitnet, ibkd, kd, report
from ._cli import parse
from ._distill import STUDENT_DATA, STUDENT_OPTIM, ensure_teacher

METHODS = {"ce": ce, "kd": kd, "at": at, "fitnet": fitnet, "ibkd": ibkd}


@dataclass(frozen=True)
class CompareConfig(RunConfig):
    """The shared settings; method-specific settings keep each recipe's defaults."""

    methods: tuple[Literal["ce", "kd", "at", "fitnet", "ibkd"], ...] = ("ce", "kd", "at", "fitnet", "ibkd")
    """Methods to run."""
    seeds: tuple[int, ...] = (0, 1)
    """Run seeds (initialisation, data order, augmentation); the validation split stays data.split_seed."""
    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """The student of every method."""
    teacher1: ModelConfig = ModelConfig(arch="resnet152", pretrained=True)
    """First teacher (the single teacher of kd/at/fitnet unless --single-teacher teacher2)."""
    teacher1_ckpt: str = "checkpoints/resnet152_ft.safetensors"
    """First teacher's fine-tuned weights; fine-tuned first when missing."""
    teacher2: ModelConfig = ModelConfig(arch="efficientnet_b2", pretrained=True)
    """Second teacher (IB-KD only)."""
    teacher2_ckpt: str = "checkpoints/efficientnet_b2_ft.safetensors"
    """Second teacher's fine-tuned weights; fine-tuned first when missing."""
    teacher_epochs: int = 30
    """Fine-tuning epochs of a missing teacher."""
    single_teacher: Literal["teacher1", "teacher2"] = "teacher1"
    """Teacher of the single-teacher baselines."""
    report_name: str = "compare"
    """Base name of the report files (in --report-dir)."""
    report_dir: str = "reports"
    """Where the table and plot are written."""
    stage_a_epochs: int = 20
    """IB-KD stage-A (MBM) epochs."""


CONFIG = CompareConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: CompareConfig) -> list[dict]:
    ensure_teacher(cfg, cfg.teacher1, cfg.teacher1_ckpt, cfg.teacher_epochs)
    if "ibkd" in cfg.methods or cfg.single_teacher == "teacher2":
        ensure_teacher(cfg, cfg.teacher2, cfg.teacher2_ckpt, cfg.teacher_epochs)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    single = (cfg.teacher1, cfg.teacher1_ckpt) if cfg.single_teacher == "teacher1" else (cfg.teacher2, cfg.teacher2_ckpt)
    run_dirs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            module = METHODS[method]
            overrides: dict = {**shared, "seed": seed, "student": cfg.student, "run_name": ""}
            if method in ("kd", "at", "fitnet"):
                overrides.update(teacher=single[0], teacher_ckpt=single[1])
            if method == "ibkd":
                overrides.update(teacher1=cfg.teacher1, teacher1_ckpt=cfg.teacher1_ckpt, teacher2=cfg.teacher2,
                                 teacher2_ckpt=cfg.teacher2_ckpt,
                                 stage_a=dataclasses.replace(module.CONFIG.stage_a, epochs=cfg.stage_a_epochs))
            say(f"\n=== {method}, seed {seed} ===")
            summary = module.run(dataclasses.replace(module.CONFIG, **overrides))
            run_dirs.append(summary["run_dir"])
    say("")
    return report.run(report.ReportConfig(runs=tuple(run_dirs), out=cfg.report_dir, name=cfg.report_name))


def main(argv=None, prog="launch.py recipes.compare"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
