"""Run directories and their logs.

``runs/<recipe>-<time>/`` holds ``config.json`` (the resolved recipe), ``metrics.jsonl`` (one record per
log step and per epoch), ``summary.json`` (final numbers) and the ``.safetensors`` checkpoints:
``last.safetensors`` (the whole train state, for ``--resume``), ``best.safetensors`` /
``best_ema.safetensors`` (weights selected on validation accuracy, never on test).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from .checkpoint import read_metadata, write_atomically
from .config import RunConfig, short_warmup_warning, to_dict
from .distributed import world
from .errors import ConfigError, OutputError, writing


class Run:
    """A run directory and its append-only logs.

    Nothing is written before the run has something to record: the directory and its ``config.json`` appear
    at the first log line or checkpoint, so an error while loading data, teachers or caches leaves no trace.
    Resuming, that first use also tidies the interrupted run: metric records logged after its latest
    checkpoint (they are logged again) and ``*.tmp`` files of an interrupted checkpoint write are removed.
    With ``--log.tensorboard True`` every numeric field of each record also goes to TensorBoard.
    In a data-parallel job only rank 0 writes; the other ranks know the same directory and read from it.
    """

    def __init__(self, root: Path, config: dict[str, Any], *, resuming: bool = False, named: bool = False,
                 tensorboard: bool = False, warning: str | None = None):
        self.root = root
        self._warning = warning  # printed (stderr, once) when the run starts writing: after every check passed
        self._config = config  # what config.json holds once the directory exists
        self._resuming = resuming
        self._named = named  # an explicit --run-name is never renamed and never reused
        self._tensorboard = tensorboard
        self._writer = None
        self._ready = False

    @staticmethod
    def check(cfg: RunConfig) -> None:
        """Fail before any work when this run could not write its directory: an explicit ``--run-name``
        that exists already, an ``--out-dir`` (or resumed run) that cannot be written, TensorBoard asked
        for but not installed."""
        if cfg.log.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("--log.tensorboard True needs the tensorboard package: "
                                  "pip install -e '.[tensorboard]'") from None
        if cfg.resume:
            check_writable(Path(cfg.resume), "")
            return
        if cfg.run_name:
            root = Path(cfg.out_dir) / cfg.run_name
            if root.exists() or root.is_symlink():
                raise OutputError(f"run directory {root} already exists: continue it with --resume {root}, "
                                  f"or choose another --run-name")
        check_writable(Path(cfg.out_dir), " (choose another --out-dir)")

    @classmethod
    def create(cls, cfg: RunConfig, recipe: str) -> "Run":
        cls.check(cfg)
        if cfg.resume:
            root = Path(cfg.resume)
            saved = json.loads((root / "config.json").read_text())
            config = {"recipe": saved.get("recipe", recipe), **to_dict(cfg), "resume": saved.get("resume", "")}
            return cls(root, config, resuming=True, tensorboard=cfg.log.tensorboard,
                       warning=short_warmup_warning(cfg))
        name = cfg.run_name or f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        root = Path(cfg.out_dir) / name
        suffix = 1
        while root.exists() and not cfg.run_name:
            suffix += 1
            root = Path(cfg.out_dir) / f"{name}-{suffix}"
        if world().size > 1:  # every rank uses rank 0's name (the clocks may straddle a second)
            import torch.distributed as dist
            names = [str(root)]
            dist.broadcast_object_list(names, src=0)
            root = Path(names[0])
        return cls(root, {"recipe": recipe, **to_dict(cfg)}, named=bool(cfg.run_name),
                   tensorboard=cfg.log.tensorboard, warning=short_warmup_warning(cfg))

    def _use(self) -> None:
        global _ACTIVE
        if self._ready:
            return
        _ACTIVE = self
        if not world().main:  # rank 0 creates and tidies the directory
            self._ready = True
            return
        if self._resuming:
            self._tidy_interrupted()
        else:
            self._make_directory()
        self._ready = True
        if self._warning:
            print(self._warning, file=sys.stderr, flush=True)
        if self._tensorboard:
            self._open_tensorboard()

    def _make_directory(self) -> None:
        base, suffix = self.root, 1
        while True:
            try:
                self.root.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:  # a run of the same name appeared since create()
                if self._named:
                    raise OutputError(f"run directory {self.root} already exists: continue it with --resume "
                                      f"{self.root}, or choose another --run-name") from None
                suffix += 1
                self.root = base.with_name(f"{base.name}-{suffix}")
            except OSError as exc:
                raise OutputError(f"cannot create run directory {self.root}: "
                                  f"{(exc.strerror or type(exc).__name__).lower()}") from None
        self._write_config()

    def _write_config(self) -> None:
        write_atomically(self.root / "config.json", json.dumps(self._config, indent=2, sort_keys=True).encode())

    def _tidy_interrupted(self) -> None:
        # A recipe resumes from last.safetensors (a stage's own <tag>_last.safetensors restarts with its stage).
        points = set()
        if (self.root / "last.safetensors").is_file():
            meta = read_metadata(self.root / "last.safetensors")
            points.add((meta.get("tag", ""), int(json.loads(meta.get("epoch", "0")))))
        metrics = self.root / "metrics.jsonl"
        if metrics.is_file():
            lines = metrics.read_text().splitlines(keepends=True)
            kept = metrics_to_keep(lines, points)
            if kept != lines:
                write_atomically(metrics, "".join(kept).encode())
        for orphan in self.root.glob("*.tmp"):
            orphan.unlink()
        if json.loads((self.root / "config.json").read_text()) != self._config:  # e.g. --epochs extended
            self._write_config()

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = self.root / "tensorboard"
        if self._resuming:  # rebuilt from metrics.jsonl, so both hold each record once
            shutil.rmtree(folder, ignore_errors=True)
        with writing(folder):
            self._writer = SummaryWriter(str(folder))
        metrics = self.root / "metrics.jsonl"
        if self._resuming and metrics.is_file():
            for line in metrics.read_text().splitlines():
                self._to_tensorboard(json.loads(line))
            self._writer.flush()

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        for tag, value, step in tensorboard_scalars(record):
            self._writer.add_scalar(tag, value, step)

    def log(self, record: dict[str, Any]) -> None:
        self._use()
        if not world().main:
            return
        path = self.root / "metrics.jsonl"
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            with writing(self.root / "tensorboard"):
                self._to_tensorboard(record)
                self._writer.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._use()
        if not world().main:
            return
        write_atomically(self.root / "summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())

    def path(self, name: str) -> Path:
        self._use()
        return self.root / name


_ACTIVE: Run | None = None  # the run whose directory this process wrote last (named when it is interrupted)


def interrupted_advice() -> str:
    """What an interrupted command tells the user: which run directory to resume, with the command."""
    run = _ACTIVE
    if run is None or not run.root.is_dir():
        return "no run directory had been written yet, nothing to resume"
    command = f"python launch.py recipes.{run._config.get('recipe', 'NAME')} --resume {run.root}"
    if any(run.root.glob("*last.safetensors")):
        return f"the last finished epoch's checkpoint is in {run.root}; continue with: {command}"
    return f"no epoch of {run.root} had finished; {command} starts it over"


def check_writable(folder: Path, hint: str) -> None:
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {folder}: {probe} is a file, not a folder{hint}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {probe}: permission denied or a read-only file system{hint}")


def metrics_to_keep(lines: list[str], checkpoints: set[tuple[str, int]]) -> list[str]:
    """The lines of an interrupted run's metrics.jsonl that its resumed run keeps: those up to the epoch
    record of the checkpoint it resumes from (``checkpoints``: its ``(stage tag, epoch)``; none = a restart
    from scratch). Everything logged after it (the interrupted epoch, a stage that restarts from its
    beginning) is logged again by the resumed run."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line) if line.endswith("\n") else None)
        except json.JSONDecodeError:
            records.append(None)  # a line torn by the interruption
    ends = [i for i, r in enumerate(records)
            if r and r.get("kind") == "epoch" and (r.get("stage", ""), r.get("epoch")) in checkpoints]
    if ends or not checkpoints:
        return [line for line, r in zip(lines[:ends[-1] + 1 if ends else 0], records) if r is not None]
    # The checkpoint's epoch record is missing (an edited log): drop what is past each checkpoint's epoch.
    def past(record: dict[str, Any]) -> bool:
        return any(record.get("stage", "") == tag and record.get("epoch", 0) > epoch for tag, epoch in checkpoints)

    return [line for line, r in zip(lines, records) if r is not None and not past(r)]


def tensorboard_scalars(record: dict[str, Any]) -> Iterator[tuple[str, float, int]]:
    """``(tag, value, global step)`` of each numeric field of a metrics record: tag ``<stage>/<key>`` (the
    record's kind, ``step`` or ``epoch``, when it has no stage tag), step the record's ``step`` else its ``epoch``."""
    group = record.get("stage") or record.get("kind") or "run"
    step = int(record.get("step", record.get("epoch", 0)))
    for key, value in record.items():
        if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield (key if key.startswith(f"{group}/") else f"{group}/{key}"), float(value), step


def progress_bar(iterable, *, total: int, desc: str, disable: bool):
    """A tqdm bar unless disabled or stdout is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not sys.stdout.isatty(),
                leave=False, dynamic_ncols=True)


def say(msg: str) -> None:
    """Print (rank 0 only in a data-parallel job)."""
    if world().main:
        print(msg, flush=True)
