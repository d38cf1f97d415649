"""Shared command-line plumbing for recipes: tyro over a frozen dataclass default."""

from __future__ import annotations

import dataclasses
import sys
from typing import TypeVar

import tyro

from kd.config import RunConfig, load_run_config
from kd.errors import ConfigError

C = TypeVar("C")


def parse(default: C, argv: list[str] | None, *, prog: str, description: str) -> C:
    """Apply command-line overrides to ``default``. Booleans take explicit values (``--compile False``).

    tyro rejects an unknown field or a wrongly typed value with its own one-screen message and exit
    code 2 before anything runs; a value that passes the type check but fails a recipe's validation
    becomes a one-line :class:`ConfigError`.

    With ``--resume RUN_DIR`` the flags apply over the run's saved config instead of ``default``, so the
    fields that differ from the saved config are exactly those asked for on this command line;
    :func:`kd.supervised.resolve_resume` then applies or refuses them.
    """
    args = sys.argv[1:] if argv is None else argv
    cfg = _cli(default, args, prog, description)
    if isinstance(cfg, RunConfig) and cfg.resume:
        saved = load_run_config(type(cfg), cfg.resume)
        cfg = _cli(dataclasses.replace(saved, resume=cfg.resume), args, prog, description)
    return cfg


def _cli(default: C, args: list[str], prog: str, description: str) -> C:
    try:
        return tyro.cli(type(default), default=default, args=args, prog=prog, description=description,
                        config=(tyro.conf.FlagConversionOff,))
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
