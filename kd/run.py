"""Run directories, metric logs, evaluation and the host-side training loop.

``runs/<recipe>-<time>/`` holds ``config.json`` (the resolved recipe), ``metrics.jsonl`` (one record per
log step and per epoch), ``summary.json`` (final numbers) and the ``.safetensors`` checkpoints:
``last.safetensors`` (the whole train state, for ``--resume``), ``best.safetensors`` /
``best_ema.safetensors`` (weights selected on validation accuracy, never on test).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import tree as T
from .checkpoint import load_checkpoint, read_metadata, save_checkpoint, write_atomically
from .config import RunConfig, short_warmup_warning, to_dict
from .data import Dataset, Splits, eval_batches, steps_per_epoch, train_batches
from .distributed import barrier, sum_across_ranks, world
from .errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError, writing
from .step import accuracy_counts, read_metrics


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
            shared = [str(root)]
            dist.broadcast_object_list(shared, src=0)
            root = Path(shared[0])
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


def progress(iterable, *, total: int, desc: str, disable: bool):
    """A tqdm bar unless disabled or stdout is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not sys.stdout.isatty(),
                leave=False, dynamic_ncols=True)


def say(msg: str) -> None:
    """Print (rank 0 only in a data-parallel job)."""
    if world().main:
        print(msg, flush=True)


def all_finite(*trees: T.Tree) -> bool:
    """Whether every floating tensor of ``trees`` is finite: one fused max-abs reduction, one read-back
    (NaN and inf propagate through the maximum; a finite but huge value cannot overflow it)."""
    leaves = [t for tree in trees for t in T.leaves(tree) if t.is_floating_point() and t.numel()]
    if not leaves:
        return True
    return bool(torch.stack(torch._foreach_norm(leaves, float("inf"))).isfinite().all())


def last_good(path: Path) -> str:
    """How a non-finite failure names the checkpoint to go back to: only one that exists."""
    return f"the last good checkpoint is {path}" if path.exists() else "no checkpoint was written yet"


def evaluate_accuracy(eval_fn: Callable, params: T.Tree, buffers: T.Tree, data: Dataset, splits: Splits,
                      cfg: RunConfig, device: torch.device, on_batch: Callable[[], Any] | None = None) -> float:
    """Top-1 accuracy (%) of ``eval_fn(params, buffers, x) -> (logits, features)`` on ``data``; in a
    data-parallel job each rank evaluates its shard and the counts are summed. ``on_batch`` is called
    after each batch (a progress bar's update)."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    # A compiled eval function is specialised to its batch shape: the last, smaller batch of a split is padded
    # with zero images to the full batch (the network is in eval mode, so each image's logits are its own)
    # rather than compiled again for each split's remainder.
    full = math.ceil(cfg.data.eval_batch_size / world().size) if cfg.compile else 0
    for batch in eval_batches(data, splits, cfg.data, device=device, rank=world().rank, world_size=world().size):
        x, labels = batch["x"], batch["y_a"]
        if 0 < x.shape[0] < full:
            x = torch.cat([x, x.new_zeros((full - x.shape[0], *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
        logits, _ = eval_fn(params, buffers, x)
        correct += accuracy_counts(logits[: labels.shape[0]], labels)
        if on_batch is not None:
            on_batch()
    return 100.0 * float(sum_across_ranks(correct)) / max(1, len(data.labels))


@dataclass
class LoopResult:
    state: T.Tree
    best_val: float
    best_ema_val: float
    epochs_run: int
    train_seconds: float
    images_seen: int
    last_val: dict[str, float] | None = None
    """Validation accuracy of the final weights, ``{"last": ..., "ema_last": ...}``, when this call trained
    the final epoch (the final report reuses it instead of evaluating the same weights again)."""

    @property
    def images_per_second(self) -> float:
        return self.images_seen / max(self.train_seconds, 1e-9)


def training_batches(cfg: RunConfig, splits: Splits, device: torch.device
                     ) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """``epoch -> batches`` of the training split: this rank's shard, the run's memory format. The stream
    depends only on the data config, the seed and the epoch (never on the model trained)."""
    def batches(epoch: int) -> Iterator[dict[str, Tensor]]:
        for batch in train_batches(splits, cfg.data, seed=cfg.seed, epoch=epoch, device=device,
                                   rank=world().rank, world_size=world().size):
            if cfg.channels_last:
                batch = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
            yield batch
    return batches


def train_loop(cfg: RunConfig, run: Run, *, state: T.Tree, train_step: Callable, splits: Splits,
               device: torch.device, part: str, eval_fn: Callable | None, weight_meta: dict[str, Any],
               batches: Callable[[int], Iterator[dict[str, Tensor]]] | None = None,
               steps: int | None = None, epochs: int | None = None, tag: str = "",
               resume_info: dict[str, Any] | None = None,
               validate: Callable[[T.Tree, T.Tree], float] | None = None) -> LoopResult:
    """Train ``state`` for ``epochs`` epochs with ``train_step``; evaluate ``state['params'][part]``
    (and its EMA) on validation after each epoch, keep best-by-validation weights, checkpoint every epoch.

    Every training in the project runs through this loop (teachers, students, IB-KD's stage A and B).
    ``batches(epoch)`` overrides the default training batches (e.g. a feature cache); ``validate(params,
    buffers)`` overrides the default validation accuracy of ``eval_fn`` on ``splits.val``; ``tag``
    prefixes files and metrics of one stage of a multi-stage method.
    """
    if validate is None:
        def validate(params: T.Tree, buffers: T.Tree) -> float:
            return evaluate_accuracy(eval_fn, params, buffers, splits.val, splits, cfg, device)

    epochs = epochs if epochs is not None else cfg.epochs
    steps = steps if steps is not None else steps_per_epoch(splits, cfg.data)
    info = resume_info or {}
    start_epoch = int(info.get("epoch", 0))
    best_val = float(info.get("best_val", -1.0))
    best_ema_val = float(info.get("best_ema_val", -1.0))
    train_seconds = float(info.get("train_seconds", 0.0))
    images_seen = int(info.get("images_seen", 0))
    prefix = f"{tag}/" if tag else ""
    file_prefix = f"{tag}_" if tag else ""
    has_ema = "ema" in state
    weight_meta = {**weight_meta, "config": to_dict(cfg)}  # every checkpoint carries the resolved config

    make_batches = batches or training_batches(cfg, splits, device)
    last_val: dict[str, float] | None = None
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        n_images = 0
        bar = progress(make_batches(epoch), total=steps, desc=f"{tag or 'train'} {epoch + 1}/{epochs}",
                       disable=cfg.disable_tqdm)
        last: dict[str, float] = {}
        for i, batch in enumerate(bar):
            state, metrics = train_step(state, batch)
            n_images += int(batch["y_a"].shape[0]) * world().size  # every rank's shard
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps:
                last = read_metrics(metrics)
                if not math.isfinite(last["loss"]):
                    raise NonFiniteLossError(
                        f"non-finite loss ({last['loss']}) at epoch {epoch + 1}, step {i + 1}; "
                        f"{last_good(run.root / f'{file_prefix}last.safetensors')} (lower the lr or enable clipping)")
                run.log({"kind": "step", "stage": tag, "epoch": epoch + 1, "step": int(state["step"]), **last})
                bar.set_postfix(loss=f"{last['loss']:.3f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images_seen += n_images
        # The sampled losses can be finite while weights or BatchNorm statistics are not: never checkpoint those.
        if not all_finite(state["params"], state["buffers"], state.get("ema", {})):
            raise NonFiniteLossError(
                f"non-finite weights or BatchNorm statistics after epoch {epoch + 1}; "
                f"{last_good(run.root / f'{file_prefix}last.safetensors')} (lower the lr or enable clipping)")
        val = validate(state["params"][part], state["buffers"].get(part, {}))
        record: dict[str, Any] = {"kind": "epoch", "stage": tag, "epoch": epoch + 1, "seconds": seconds,
                                  "images_per_second": n_images / max(seconds, 1e-9),
                                  f"{prefix}val_acc": val, "train_loss": last.get("loss")}
        if val > best_val:
            best_val = val
            save_weights(run.path(f"{file_prefix}best.safetensors"), state["params"], state["buffers"],
                         {**weight_meta, "val_acc": val, "epoch": epoch + 1})
        if has_ema:
            ema_val = validate(state["ema"]["params"][part], state["ema"]["buffers"].get(part, {}))
            record[f"{prefix}val_acc_ema"] = ema_val
            if ema_val > best_ema_val:
                best_ema_val = ema_val
                save_weights(run.path(f"{file_prefix}best_ema.safetensors"), state["ema"]["params"],
                             state["ema"]["buffers"], {**weight_meta, "val_acc": ema_val, "epoch": epoch + 1})
        last_val = {"last": val, **({"ema_last": record[f"{prefix}val_acc_ema"]} if has_ema else {})}
        run.log(record)
        say(f"[{tag or 'train'}] epoch {epoch + 1}/{epochs}  loss {last.get('loss', float('nan')):.4f}  "
            f"val {val:.2f}%" + (f"  ema {record[f'{prefix}val_acc_ema']:.2f}%" if has_ema else "")
            + f"  {n_images / max(seconds, 1e-9):.0f} img/s")
        save_train_state(run.path(f"{file_prefix}last.safetensors"), state, {
            **weight_meta, "epoch": epoch + 1, "best_val": best_val, "best_ema_val": best_ema_val,
            "train_seconds": train_seconds, "images_seen": images_seen, "tag": tag})
        barrier()  # rank 0's checkpoints are complete before any rank reads them
    return LoopResult(state, best_val, best_ema_val, epochs, train_seconds, images_seen, last_val)


def save_weights(path: Path, params: T.Tree, buffers: T.Tree, meta: dict[str, Any]) -> None:
    """Every trainable part (student and its heads/regressors), without optimizer state (rank 0 writes)."""
    if not world().main:
        return
    save_checkpoint(path, {"params": params, "buffers": buffers}, {"kind": "weights", **meta})


def load_weights(path: str | Path, *, expect: dict[str, Any], device: torch.device) -> tuple[T.Tree, T.Tree, dict[str, str]]:
    """Model weights (``kind`` "weights": a run's best*.safetensors, a teacher recipe's --ckpt); a train
    state or another kind of checkpoint given instead is one :class:`CheckpointError` saying so."""
    tree, meta = load_checkpoint(path, expect=expect, kind="weights", device=device)
    return tree.get("params", {}), tree.get("buffers", {}), meta


def save_train_state(path: Path, state: T.Tree, meta: dict[str, Any]) -> None:
    if not world().main:
        return
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(path, {"state": state, "rng": rng}, {"kind": "train_state", **meta})


def load_train_state(path: Path, *, expect: dict[str, Any], device: torch.device, like: T.Tree
                     ) -> tuple[T.Tree, dict[str, Any]]:
    """Restore a train state saved by :func:`save_train_state`; restores the RNG too."""
    tree, meta = load_checkpoint(path, expect=expect, device=device)
    flat = T.flatten(tree["state"])
    want, have = set(T.flatten(like)), set(flat)
    if want != have:
        missing = sorted(want - have)[:3]
        raise CheckpointError(f"{path} does not match this run's state (missing e.g. {missing})")
    # Keep dtypes of the live state (e.g. step int64) and the device.
    state = T.tree_map(lambda ref, s: s.to(device=ref.device, dtype=ref.dtype), like, T.fill(like, flat))
    torch.set_rng_state(tree["rng"]["torch"].cpu())
    if "cuda" in tree["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(tree["rng"]["cuda"].cpu())
    info = {k: json.loads(v) for k, v in meta.items() if k in
            ("epoch", "best_val", "best_ema_val", "train_seconds", "images_seen")}
    return state, info


def in_order_of(tree: dict, like: dict) -> dict:
    """``tree`` with the key order of ``like`` (same keys); unchanged when the keys differ."""
    if set(tree) != set(like):
        return tree
    return {k: in_order_of(tree[k], like[k]) if isinstance(like[k], dict) and isinstance(tree[k], dict) else tree[k]
            for k in like}


def final_report(run: Run, *, state: T.Tree, part: str, eval_fn: Callable, splits: Splits, cfg: RunConfig,
                 device: torch.device, weight_meta: dict[str, Any], tag: str = "",
                 last_val: dict[str, float] | None = None) -> dict[str, float]:
    """Test and validation accuracy of the last weights and of the best-by-validation weights, for the model
    and its EMA (``state`` is the state after the run's final epoch, ``cfg.epochs``).

    Each distinct set of weights is evaluated once, under one progress bar: best weights saved at the final
    epoch are the last weights (their numbers are copied); validation accuracies already measured on the same
    weights are reused: ``last_val`` (the final epoch's, from :class:`LoopResult`) and the ``val_acc`` that a
    best checkpoint records."""
    file_prefix = f"{tag}_" if tag else ""
    weights = {"last": (state["params"][part], state["buffers"][part])}
    if "ema" in state:
        weights["ema_last"] = (state["ema"]["params"][part], state["ema"]["buffers"][part])
    val = {name: acc for name, acc in (last_val or {}).items() if name in weights}
    twins: dict[str, str] = {}  # a best checkpoint of the final epoch -> the live weights it equals
    for name, file, live in (("best", "best.safetensors", "last"), ("ema_best", "best_ema.safetensors", "ema_last")):
        path = run.path(file_prefix + file)
        if not path.exists():
            continue
        meta = read_metadata(path)
        if live in weights and json.loads(meta.get("epoch", "0")) == cfg.epochs:
            twins[name] = live
            continue
        params, buffers, meta = load_weights(path, expect={"arch": weight_meta["arch"]}, device=device)
        # in the live weights' key order: a compiled eval function guards on it (a file's order is sorted)
        weights[name] = tuple(in_order_of(loaded, live_tree) for loaded, live_tree in
                              zip((params[part], buffers.get(part, {})), weights["last"]))
        if "val_acc" in meta:
            val[name] = float(json.loads(meta["val_acc"]))
    passes = [(name, "test", splits.test) for name in weights]
    passes += [(name, "val", splits.val) for name in weights if name not in val]
    size = cfg.data.eval_batch_size
    total = sum(math.ceil(len(data) / size) for _, _, data in passes)
    bar = tqdm(total=total, desc="final evaluation", disable=cfg.disable_tqdm or not sys.stdout.isatty(),
               leave=False, dynamic_ncols=True)
    accuracies = {("val", name): acc for name, acc in val.items()}
    for name, split, data in passes:
        params, buffers = weights[name]
        accuracies[(split, name)] = evaluate_accuracy(eval_fn, params, buffers, data, splits, cfg, device,
                                                      on_batch=bar.update)
    bar.close()
    out: dict[str, float] = {}
    for name in ("last", "ema_last", "best", "ema_best"):
        source = twins.get(name, name)
        if source in weights:
            out[f"{name}_val_acc"] = accuracies[("val", source)]
            out[f"{name}_test_acc"] = accuracies[("test", source)]
    return out
