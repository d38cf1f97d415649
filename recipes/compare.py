"""Compare methods like for like: ce, kd, at, fitnet and ibkd students, several seeds, one table and plot.

Every method gets the same data, student, budget, optimizer and augmentation; the two teachers are
fine-tuned once (or reused from their checkpoints) and shared. The single-teacher baselines distil from
``--single-teacher`` (teacher1 by default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from kd.config import RunConfig
from kd.run import say

from . import at, ce, fitnet, ibkd, kd, report
from ._cli import parse
from ._distill import ensure_teacher

METHODS = {"ce": ce, "kd": kd, "at": at, "fitnet": fitnet, "ibkd": ibkd}


@dataclass(frozen=True)
class CompareConfig(ibkd.IBKDConfig):
    """IB-KD's config (its teachers, MBM and stage settings are the shared ones) plus what to compare;
    the other methods keep their recipes' method-specific defaults."""

    methods: tuple[Literal["ce", "kd", "at", "fitnet", "ibkd"], ...] = ("ce", "kd", "at", "fitnet", "ibkd")
    """Methods to run."""
    seeds: tuple[int, ...] = (0, 1)
    """Run seeds (initialisation, data order, augmentation); the validation split stays data.split_seed."""
    single_teacher: Literal["teacher1", "teacher2"] = "teacher1"
    """Teacher of the single-teacher baselines (kd, at, fitnet)."""
    report_name: str = "compare"
    """Base name of the report files (in --report-dir)."""
    report_dir: str = "reports"
    """Where the table and plot are written."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume:
            raise ValueError("compare has no --resume: resume one of its runs with that method's recipe")


CONFIG = CompareConfig(**{f.name: getattr(ibkd.CONFIG, f.name) for f in dataclasses.fields(ibkd.IBKDConfig)})


def run(cfg: CompareConfig) -> list[dict]:
    ensure_teacher(cfg, cfg.teacher1, cfg.teacher1_ckpt, cfg.teacher_epochs)
    if "ibkd" in cfg.methods or cfg.single_teacher == "teacher2":
        ensure_teacher(cfg, cfg.teacher2, cfg.teacher2_ckpt, cfg.teacher_epochs)
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    ibkd_fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ibkd.IBKDConfig)}
    single = (cfg.teacher1, cfg.teacher1_ckpt) if cfg.single_teacher == "teacher1" else (cfg.teacher2, cfg.teacher2_ckpt)
    run_dirs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            say(f"\n=== {method}, seed {seed} ===")
            if method == "ibkd":
                method_cfg = ibkd.IBKDConfig(**{**ibkd_fields, "seed": seed, "run_name": ""})
            else:
                module = METHODS[method]
                overrides: dict = {**shared, "seed": seed, "student": cfg.student, "run_name": ""}
                if method != "ce":
                    overrides.update(teacher=single[0], teacher_ckpt=single[1], teacher_epochs=cfg.teacher_epochs)
                method_cfg = dataclasses.replace(module.CONFIG, **overrides)
            run_dirs.append(METHODS[method].run(method_cfg)["run_dir"])
    say("")
    return report.run(report.ReportConfig(runs=tuple(run_dirs), out=cfg.report_dir, name=cfg.report_name))


def main(argv=None, prog="launch.py recipes.compare"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
