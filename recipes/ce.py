"""CE baseline: the student trained alone with label smoothing, same data and schedule as IB-KD stage B."""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.ce import METHOD, CEConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "CEConfig", "run", "main"]

CONFIG = CEConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: CEConfig, recipe: str = "ce") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.ce"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
