"""Quickstart: the whole ASMB pipeline on the built-in synthetic data in a few minutes on a laptop CPU.

Fine-tunes two small, different teachers (resnet20, wrn_16_1), trains the MBM (stage A) and the student
(resnet8, stage B), trains the same student alone (CE baseline), and writes a comparison report.
Compilation is off by default because on a CPU compiling takes longer than this whole run; pass
``--compile True`` on a GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kd.config import ModelConfig
from kd.methods.ibkd import StageAConfig
from kd.rundir import say
from kd.teachers import TeacherSpec

from . import ce, ibkd, report
from ._cli import parse


@dataclass(frozen=True)
class QuickstartConfig(ibkd.IBKDConfig):
    """IB-KD on synthetic data with small models, plus a CE baseline and a report."""

    baseline: bool = True
    """Also train the student alone with cross-entropy, for comparison."""
    report_dir: str = "reports"
    """Where the comparison table and plot are written."""


CONFIG = QuickstartConfig(
    data=dataclasses.replace(ibkd.CONFIG.data, name="synthetic", synthetic_size=2400, synthetic_classes=10,
                             val_size=400, batch_size=64),
    optim=dataclasses.replace(ibkd.CONFIG.optim, warmup_epochs=1),
    epochs=8,
    student=ModelConfig(arch="resnet8"),
    teachers=(TeacherSpec(arch="resnet20", pretrained=False, ckpt="checkpoints/quickstart/resnet20.safetensors"),
              TeacherSpec(arch="wrn_16_1", pretrained=False, ckpt="checkpoints/quickstart/wrn_16_1.safetensors")),
    teacher_epochs=10,
    stage_a=StageAConfig(epochs=15, batch_size=128),
    compile=False,
    log_every=10,
)


def run(cfg: QuickstartConfig) -> dict:
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ibkd.IBKDConfig)}
    summary = ibkd.run(ibkd.IBKDConfig(**base), recipe="quickstart-ibkd")
    runs = [summary["run_dir"]]
    if cfg.baseline:
        ce_cfg = ce.CEConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ce.CEConfig)
                                if hasattr(cfg, f.name) and f.name not in ("label_smoothing", "grad_clip_norm")},
                             label_smoothing=cfg.stage_b.label_smoothing)
        runs.append(ce.run(ce_cfg, recipe="quickstart-ce")["run_dir"])
    say("")
    report.run(report.ReportConfig(runs=tuple(runs), out=cfg.report_dir, name="quickstart"))
    return summary


def main(argv=None, prog="launch.py recipes.quickstart"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
