"""CA-MKD: confidence-aware multi-teacher KD (Zhang et al., ICASSP 2022), its logit part.

Per sample, each teacher is weighted by how well it predicts the label: CE + (1/K) * sum_k w_k * T^2 * KL(p_k || student).
"""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.camkd import METHOD, CAMKDConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "CAMKDConfig", "run", "main"]

CONFIG = CAMKDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: CAMKDConfig, recipe: str = "camkd") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.camkd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
