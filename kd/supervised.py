"""What every training run shares before and after its loop: resolving ``--resume``, the run's preparation
(device, data, run directory), the constant clipping threshold and the accuracy table; used by
:func:`kd.train.distill`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from .config import RunConfig, load_run_config, resolve_device, setup, to_dict
from .data import Splits, load_splits
from .errors import ConfigError
from .rundir import Run, say


def constant(value: float, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    threshold = torch.tensor(float(value), device=device)
    return lambda step: threshold


# What a resumed run may change: none of it alters the work already done or the state carried over.
# More epochs continue on the schedule recomputed for the new total; everything else is refused.
RESUME_MAY_CHANGE = ("epochs", "log_every", "disable_tqdm", "log.tensorboard", "teacher_cache",
                     "teacher_cache_max_gb")


def resolve_resume(cfg: RunConfig) -> RunConfig:
    """The config this invocation runs with, checked before any work (device, run directory).

    With ``--resume RUN_DIR`` it is the run's saved config. Each field of ``cfg`` that differs from it was
    asked for (on the command line, :func:`recipes._cli.parse` applies the flags over the saved config): it
    is applied when it is in :data:`RESUME_MAY_CHANGE` (``epochs`` only upwards, and not across IB-KD
    stages), and refused otherwise with one :class:`ConfigError` naming every such field.
    """
    if cfg.resume:
        saved = load_run_config(type(cfg), cfg.resume)
        asked = _differences(to_dict(saved), to_dict(cfg))
        asked.pop("resume", None)
        refused = [name for name in asked if name not in RESUME_MAY_CHANGE]
        if refused:
            shown = ", ".join(f"{_flag(name)} (run: {asked[name][0]!r}, asked: {asked[name][1]!r})"
                              for name in refused)
            may = ", ".join(_flag(name) for name in RESUME_MAY_CHANGE)
            raise ConfigError(f"--resume {cfg.resume} continues that run with its saved config; these flags would "
                              f"change it mid-run: {shown}. Only {may} may change on a resume (start a new run "
                              f"for the rest)")
        if cfg.epochs < saved.epochs:
            raise ConfigError(f"--epochs {cfg.epochs} is below the {saved.epochs} epochs of {cfg.resume}: a resumed "
                              f"run can only train as long or longer")
        if cfg.epochs != saved.epochs and getattr(saved, "num_stages", 1) > 1:
            raise ConfigError(f"--epochs cannot change on resuming {cfg.resume}: its {saved.num_stages} stages "
                              f"split the epochs, so the stage boundaries would move")
        check_resumable(Path(cfg.resume), saved.epochs, cfg.epochs, extendable=getattr(saved, "num_stages", 1) == 1)
        cfg = dataclasses.replace(saved, resume=cfg.resume, **{name: getattr(cfg, name) for name in asked
                                                               if "." not in name}, log=cfg.log)
    resolve_device(cfg.device)
    Run.check(cfg)
    return cfg


# What a run directory holds once epochs have finished; never overwritten by a resume that starts over.
FINISHED_WORK = ("summary.json", "best.safetensors", "best_ema.safetensors")


def check_resumable(run_dir: Path, saved_epochs: int, epochs: int, *, extendable: bool = True) -> None:
    """Refuse a resume that would lose work: a run whose ``last.safetensors`` is gone although epochs have
    finished (it would be retrained from epoch 0 over them), or a finished run asked for no more epochs."""
    done = [name for name in FINISHED_WORK if (run_dir / name).exists()]
    if done and not (run_dir / "last.safetensors").is_file():
        raise ConfigError(f"cannot resume {run_dir}: its last.safetensors is missing, so it would restart from epoch "
                          f"0 and overwrite its finished work ({', '.join(done)}); put last.safetensors back, or "
                          f"start a new run")
    if (run_dir / "summary.json").is_file() and epochs == saved_epochs:
        longer = f"add --epochs N with N > {saved_epochs} to train it longer, or " if extendable else ""
        raise ConfigError(f"{run_dir} is finished (all its {saved_epochs} epochs, summary.json written): nothing to "
                          f"resume; {longer}start a new run")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _differences(saved: dict[str, Any], asked: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"optim.lr": (saved value, asked value), ...}`` over the leaves of two :func:`to_dict` trees."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in saved.keys() | asked.keys():
        a, b = saved.get(key), asked.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return dict(sorted(out.items()))


def prepare(cfg: RunConfig, recipe: str) -> tuple[RunConfig, torch.device, Splits, Run]:
    """The device, the data and the run directory of a config :func:`resolve_resume` has resolved."""
    cfg, device = setup(cfg)
    splits = load_splits(cfg.data, cfg.seed)
    run = Run.create(cfg, recipe)
    return cfg, device, splits, run


def print_accuracy_table(summary: dict[str, Any]) -> None:
    rows = [k[: -len("_test_acc")] for k in summary if k.endswith("_test_acc")]
    say("\n| weights | val acc (%) | test acc (%) |\n|---|---|---|")
    for row in rows:
        say(f"| {row} | {summary[row + '_val_acc']:.2f} | {summary[row + '_test_acc']:.2f} |")
