"""at with the peer CIFAR-100 table recipe: resnet32x4 -> resnet8x4, SGD 0.05, batch 64, 240 epochs, /10 at 150/180/210."""

from __future__ import annotations

from kd.methods.base import cifar_table

from . import at as base
from ._cli import parse

CONFIG = cifar_table(base.CONFIG)


def main(argv=None, prog="launch.py recipes.at_cifar"):
    base.run(parse(CONFIG, argv, prog=prog, description=__doc__), recipe="at_cifar")
    return 0
