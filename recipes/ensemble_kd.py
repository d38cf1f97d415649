"""Ensemble KD: Hinton KD towards the teachers' averaged probabilities, (1-a)*CE + a*T^2*KL(mean_i p_i || student).

The fixed-rule fusion of IB-KD's two teachers by default (any number from two; T 4, a 0.9, as recipes.kd): the
baseline the MBM has to beat.
"""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.ensemble_kd import METHOD, EnsembleKDConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "EnsembleKDConfig", "run", "main"]

CONFIG = EnsembleKDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: EnsembleKDConfig, recipe: str = "ensemble_kd") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.ensemble_kd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
