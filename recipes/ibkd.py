"""ASMB IB-KD: two fine-tuned teachers fused by an information bottleneck (MBM) distil into a student."""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.ibkd import METHOD, IBKDConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "IBKDConfig", "run", "main"]

CONFIG = IBKDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: IBKDConfig, recipe: str = "ibkd") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.ibkd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
