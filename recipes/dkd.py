"""Decoupled KD (Zhao et al., CVPR 2022): CE + warm * (alpha * TCKD + beta * NCKD) from one fine-tuned teacher.

TCKD distils the binary target-vs-rest probabilities, NCKD the distribution over the non-target classes;
Hinton's KD weights NCKD by the teacher's (small) non-target mass, DKD gives it its own weight beta.
Defaults are mdistiller's CIFAR-100 ones (alpha 1, beta 8, T 4, warm-up over 20 of 240 epochs).
"""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.dkd import METHOD, DKDConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "DKDConfig", "run", "main"]

CONFIG = DKDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: DKDConfig, recipe: str = "dkd") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.dkd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
