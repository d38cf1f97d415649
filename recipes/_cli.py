"""Shared command-line plumbing for recipes: tyro over a frozen dataclass default."""

from __future__ import annotations

import sys
from typing import TypeVar

import tyro

from kd.errors import ConfigError

C = TypeVar("C")


def parse(default: C, argv: list[str] | None, *, prog: str, description: str) -> C:
    """Apply command-line overrides to ``default``. Booleans take explicit values (``--compile False``).

    tyro rejects an unknown field or a wrongly typed value with its own one-screen message and exit
    code 2 before anything runs; a value that passes the type check but fails a recipe's validation
    becomes a one-line :class:`ConfigError`.
    """
    try:
        return tyro.cli(type(default), default=default, args=sys.argv[1:] if argv is None else argv, prog=prog,
                        description=description, config=(tyro.conf.FlagConversionOff,))
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
