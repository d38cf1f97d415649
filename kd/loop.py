"""The host-side training loop of every training, its evaluation and the final report: epochs of the pure
compiled step, validation after each, best-by-validation weights and the train state checkpointed every
epoch (kd/checkpoint.py), records in the run directory (kd/rundir.py)."""

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
from .checkpoint import load_weights, read_metadata, save_train_state, save_weights
from .config import RunConfig, to_dict
from .data import Dataset, Splits, eval_batches, steps_per_epoch, train_batches
from .distributed import barrier, sum_across_ranks, world
from .errors import NonFiniteLossError
from .rundir import Run, progress_bar, say
from .step import accuracy_counts, read_metrics


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
        bar = progress_bar(make_batches(epoch), total=steps, desc=f"{tag or 'train'} {epoch + 1}/{epochs}",
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
