"""Shared command-line plumbing for recipes: tyro over a frozen dataclass default."""

from __future__ import annotations

import dataclasses
import sys
from typing import TypeVar

import tyro

from kd.config import RENAMED_TEACHERS, RunConfig, apply_config_file, load_run_config
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
    args = list(sys.argv[1:] if argv is None else argv)
    _renamed(default, args)
    path, args = _config_flag(args)
    if path is not None:
        default = apply_config_file(default, path)
    description = f"{description or ''}\n\n{CONFIG_HELP}"
    cfg = _cli(default, args, prog, description)
    if isinstance(cfg, RunConfig) and cfg.resume:
        saved = load_run_config(type(cfg), cfg.resume)
        cfg = _cli(dataclasses.replace(saved, resume=cfg.resume), args, prog, description)
    return cfg


CONFIG_HELP = ("--config FILE starts from a JSON (or YAML) file of fields (any subset; a run's config.json "
               "reproduces that run), the flags apply over it.")


def _config_flag(args: list[str]) -> tuple[str | None, list[str]]:
    """``--config FILE`` (or ``--config=FILE``) taken out of ``args``."""
    rest, path = [], None
    i = 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file: --config FILE (JSON or YAML)")
            path, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--config="):
            path = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return path, rest


# Flags renamed when the teachers became one list (``--teachers.0.*``, ``--teachers.1.*``, ...).
RENAMED_TEACHER_FLAGS = {name: i for names in RENAMED_TEACHERS for i, name in enumerate(names)}  # old name -> index
RENAMED_SINGLE_TEACHER = {"teacher1": "0", "teacher2": "1", "stronger": "-1"}


def _renamed(default: object, args: list[str]) -> None:
    """A flag of an earlier version (``--teacher1.arch``, ``--teacher2-ckpt``, ``--single-teacher teacher1``) is
    one :class:`ConfigError` naming the flag that replaced it."""
    if not hasattr(default, "teachers"):  # recipes.teacher's --teacher is its own network, not renamed
        return
    for i, arg in enumerate(args):
        name, _, _ = arg.partition("=")
        head, dot, field = name[2:].replace("_", "-").partition(".")
        if name.startswith("--") and head.endswith("-ckpt") and head[: -len("-ckpt")] in RENAMED_TEACHER_FLAGS:
            new = f"--teachers.{RENAMED_TEACHER_FLAGS[head[: -len('-ckpt')]]}.ckpt"
        elif name.startswith("--") and dot and head in RENAMED_TEACHER_FLAGS:
            new = f"--teachers.{RENAMED_TEACHER_FLAGS[head]}.{field}"
        elif name == "--single-teacher" and i + 1 < len(args) and args[i + 1] in RENAMED_SINGLE_TEACHER:
            raise ConfigError(f"--single-teacher {args[i + 1]} is now --single-teacher "
                              f"{RENAMED_SINGLE_TEACHER[args[i + 1]]} (an index of --teachers; -1 = the stronger)")
        else:
            continue
        raise ConfigError(f"{name} is now {new}: the teachers are one list (--teachers.0.arch, --teachers.0.ckpt, "
                          f"--teachers.1.arch, ...)")


def _cli(default: C, args: list[str], prog: str, description: str) -> C:
    try:
        return tyro.cli(type(default), default=default, args=args, prog=prog, description=description,
                        config=(tyro.conf.FlagConversionOff,))
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
