"""Fine-tune a teacher with cross-entropy (SPEC 5) and write its best-by-validation weights to --ckpt."""

from __future__ import annotations

from kd.teachers import FINE_TUNING, TeacherConfig, fine_tune

from ._cli import parse

__all__ = ["CONFIG", "TeacherConfig", "run", "main"]

CONFIG = FINE_TUNING


def run(cfg: TeacherConfig) -> dict:
    return fine_tune(cfg)


def main(argv=None, prog="launch.py recipes.teacher"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
