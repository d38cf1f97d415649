"""Attention Transfer baseline (Zagoruyko & Komodakis, p=2): CE + beta * sum over stage pairs of L_AT."""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.at import METHOD, ATConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "ATConfig", "run", "main"]

CONFIG = ATConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: ATConfig, recipe: str = "at") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.at"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
