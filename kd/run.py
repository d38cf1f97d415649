"""Run directories, metric logs, evaluation and the host-side training loop.

``runs/<recipe>-<time>/`` holds ``config.json`` (the resolved recipe), ``metrics.jsonl`` (one record per
log step and per epoch), ``summary.json`` (final numbers) and the ``.safetensors`` checkpoints:
``last.safetensors`` (the whole train state, for ``--resume``), ``best.safetensors`` /
``best_ema.safetensors`` (weights selected on validation accuracy, never on test).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import tree as T
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig, to_dict
from .data import Dataset, Splits, eval_batches, steps_per_epoch, train_batches
from .errors import CheckpointError, NonFiniteLossError
from .step import accuracy_counts, read_metrics


class Run:
    """A run directory and its append-only logs."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, cfg: RunConfig, recipe: str) -> "Run":
        if cfg.resume:
            run = cls(Path(cfg.resume))
        else:
            name = cfg.run_name or f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
            root = Path(cfg.out_dir) / name
            suffix = 1
            while root.exists() and not cfg.run_name:
                suffix += 1
                root = Path(cfg.out_dir) / f"{name}-{suffix}"
            run = cls(root)
            (run.root / "config.json").write_text(
                json.dumps({"recipe": recipe, **to_dict(cfg)}, indent=2, sort_keys=True))
        return run

    def log(self, record: dict[str, Any]) -> None:
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.root / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))

    def path(self, name: str) -> Path:
        return self.root / name


def progress(iterable, *, total: int, desc: str, disable: bool):
    """A tqdm bar unless disabled or stdout is not a terminal."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not sys.stdout.isatty(),
                leave=False, dynamic_ncols=True)


def say(msg: str) -> None:
    print(msg, flush=True)


def evaluate_accuracy(eval_fn: Callable, params: T.Tree, buffers: T.Tree, data: Dataset, splits: Splits,
                      cfg: RunConfig, device: torch.device) -> float:
    """Top-1 accuracy (%) of ``eval_fn(params, buffers, x) -> (logits, features)`` on ``data``."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for batch in eval_batches(data, splits, cfg.data, device=device):
        x = batch["x"].contiguous(memory_format=torch.channels_last) if cfg.channels_last else batch["x"]
        logits, _ = eval_fn(params, buffers, x)
        correct += accuracy_counts(logits, batch["y_a"])
    return 100.0 * float(correct) / max(1, len(data.labels))


@dataclass
class LoopResult:
    state: T.Tree
    best_val: float
    best_ema_val: float
    epochs_run: int
    train_seconds: float
    images_seen: int

    @property
    def images_per_second(self) -> float:
        return self.images_seen / max(self.train_seconds, 1e-9)


def train_loop(cfg: RunConfig, run: Run, *, state: T.Tree, train_step: Callable, splits: Splits,
               device: torch.device, part: str, eval_fn: Callable, weight_meta: dict[str, Any],
               batches: Callable[[int], Iterator[dict[str, Tensor]]] | None = None,
               steps: int | None = None, epochs: int | None = None, tag: str = "",
               resume_info: dict[str, Any] | None = None) -> LoopResult:
    """Train ``state`` for ``epochs`` epochs with ``train_step``; evaluate ``state['params'][part]``
    (and its EMA) on validation after each epoch, keep best-by-validation weights, checkpoint every epoch.

    ``batches(epoch)`` overrides the default training batches (e.g. a feature cache); ``tag`` prefixes
    files and metrics of one stage of a multi-stage method.
    """
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

    def default_batches(epoch: int):
        for batch in train_batches(splits, cfg.data, seed=cfg.seed, epoch=epoch, device=device):
            if cfg.channels_last:
                batch = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
            yield batch

    make_batches = batches or default_batches
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        n_images = 0
        bar = progress(make_batches(epoch), total=steps, desc=f"{tag or 'train'} {epoch + 1}/{epochs}",
                       disable=cfg.disable_tqdm)
        last: dict[str, float] = {}
        for i, batch in enumerate(bar):
            state, metrics = train_step(state, batch)
            n_images += int(batch["y_a"].shape[0])
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps:
                last = read_metrics(metrics)
                if not math.isfinite(last["loss"]):
                    raise NonFiniteLossError(
                        f"non-finite loss ({last['loss']}) at epoch {epoch + 1}, step {i + 1}; the last good "
                        f"checkpoint is {run.path(file_prefix + 'last.safetensors')} (lower the lr or enable clipping)")
                run.log({"kind": "step", "stage": tag, "epoch": epoch + 1, "step": int(state["step"]), **last})
                bar.set_postfix(loss=f"{last['loss']:.3f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        images_seen += n_images
        val = evaluate_accuracy(eval_fn, state["params"][part], state["buffers"][part], splits.val, splits, cfg, device)
        record: dict[str, Any] = {"kind": "epoch", "stage": tag, "epoch": epoch + 1, "seconds": seconds,
                                  "images_per_second": n_images / max(seconds, 1e-9),
                                  f"{prefix}val_acc": val, "train_loss": last.get("loss")}
        if val > best_val:
            best_val = val
            save_weights(run.path(f"{file_prefix}best.safetensors"), state["params"], state["buffers"],
                         {**weight_meta, "val_acc": val, "epoch": epoch + 1})
        if has_ema:
            ema_val = evaluate_accuracy(eval_fn, state["ema"]["params"][part], state["ema"]["buffers"][part],
                                        splits.val, splits, cfg, device)
            record[f"{prefix}val_acc_ema"] = ema_val
            if ema_val > best_ema_val:
                best_ema_val = ema_val
                save_weights(run.path(f"{file_prefix}best_ema.safetensors"), state["ema"]["params"],
                             state["ema"]["buffers"], {**weight_meta, "val_acc": ema_val, "epoch": epoch + 1})
        run.log(record)
        say(f"[{tag or 'train'}] epoch {epoch + 1}/{epochs}  loss {last.get('loss', float('nan')):.4f}  "
            f"val {val:.2f}%" + (f"  ema {record[f'{prefix}val_acc_ema']:.2f}%" if has_ema else "")
            + f"  {n_images / max(seconds, 1e-9):.0f} img/s")
        save_train_state(run.path(f"{file_prefix}last.safetensors"), state, {
            **weight_meta, "epoch": epoch + 1, "best_val": best_val, "best_ema_val": best_ema_val,
            "train_seconds": train_seconds, "images_seen": images_seen, "tag": tag})
    return LoopResult(state, best_val, best_ema_val, epochs, train_seconds, images_seen)


def save_weights(path: Path, params: T.Tree, buffers: T.Tree, meta: dict[str, Any]) -> None:
    """Every trainable part (student and its heads/regressors), without optimizer state."""
    save_checkpoint(path, {"params": params, "buffers": buffers}, {"kind": "weights", **meta})


def load_weights(path: str | Path, *, expect: dict[str, Any], device: torch.device) -> tuple[T.Tree, T.Tree, dict[str, str]]:
    tree, meta = load_checkpoint(path, expect=expect, device=device)
    return tree.get("params", {}), tree.get("buffers", {}), meta


def save_train_state(path: Path, state: T.Tree, meta: dict[str, Any]) -> None:
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


def final_report(run: Run, *, state: T.Tree, part: str, eval_fn: Callable, splits: Splits, cfg: RunConfig,
                 device: torch.device, weight_meta: dict[str, Any], tag: str = "") -> dict[str, float]:
    """Test (and validation) accuracy of the last weights and of the best-by-validation weights,
    for the model and its EMA."""
    file_prefix = f"{tag}_" if tag else ""
    out: dict[str, float] = {}
    candidates = [("last", state["params"][part], state["buffers"][part])]
    if "ema" in state:
        candidates.append(("ema_last", state["ema"]["params"][part], state["ema"]["buffers"][part]))
    for name, file in (("best", "best.safetensors"), ("ema_best", "best_ema.safetensors")):
        path = run.path(file_prefix + file)
        if path.exists():
            params, buffers, _ = load_weights(path, expect={"arch": weight_meta["arch"]}, device=device)
            candidates.append((name, params[part], buffers.get(part, {})))
    for name, params, buffers in candidates:
        out[f"{name}_val_acc"] = evaluate_accuracy(eval_fn, params, buffers, splits.val, splits, cfg, device)
        out[f"{name}_test_acc"] = evaluate_accuracy(eval_fn, params, buffers, splits.test, splits, cfg, device)
    return out
