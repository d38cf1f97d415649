"""fitnet with the peer CIFAR-100 table recipe: resnet32x4 -> resnet8x4, SGD 0.05, batch 64, 240 epochs, /10 at 150/180/210."""

from __future__ import annotations

import dataclasses

from kd.methods.base import cifar_table

from . import fitnet as base
from ._cli import parse

CONFIG = dataclasses.replace(cifar_table(base.CONFIG), alpha_hint=100.0)


def main(argv=None, prog="launch.py recipes.fitnet_cifar"):
    base.run(parse(CONFIG, argv, prog=prog, description=__doc__), recipe="fitnet_cifar")
    return 0
