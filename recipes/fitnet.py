"""FitNets baseline: CE + alpha_hint * MSE(pool(regressor(student stage)), teacher stage); single-stage.

The original FitNets trains the hint first and the classifier second; like the peer CIFAR tables, this
recipe trains both at once (one stage). The 1x1 regressor is built from the known feature shapes
before training and saved with the student.
"""

from __future__ import annotations

from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.fitnet import METHOD, FitNetConfig
from kd.train import distill

from ._cli import parse

__all__ = ["CONFIG", "FitNetConfig", "run", "main"]

CONFIG = FitNetConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def run(cfg: FitNetConfig, recipe: str = "fitnet") -> dict:
    return distill(cfg, METHOD, recipe)


def main(argv=None, prog="launch.py recipes.fitnet"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
