"""Hinton KD baseline: (1-a)*CE + a*T^2*KL(teacher || student) from one fine-tuned teacher (T 4, a 0.9)."""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.kd import METHOD, KDConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "KDConfig", "run", "main"]

CONFIG = KDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: KDConfig, recipe: str = "kd") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.kd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
