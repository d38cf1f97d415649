"""Batches: one epoch of shuffled, augmented, mixed training batches, or every image of a split once for
evaluation; in-memory and folder data alike, optionally one data-parallel rank's share, optionally built in
a background thread.

Sharding: a training batch of `batch_size` images is the global batch of a step; rank r of `world_size`
gets positions [r * b, (r + 1) * b) of it, b = batch_size // world_size. Every draw (order, crops, flips,
RandAugment, the mixing permutation and coefficients) is made for the global batch, so with in-memory data
the ranks' shards concatenated are exactly the world_size=1 batch, mixing included (a rank also augments
the partners its images are mixed with). Folder data mixes within a rank's shard, since a partner on
another rank would have to be decoded twice. Evaluation splits each global batch of eval_batch_size into
near-equal contiguous shards (no padding, no duplicate: the counts of the ranks add up to the split).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from . import folder
from .augment import _normalize, _stats_on, apply_randaugment, crop_flip, draw_mix, draw_randaugment, mix_batch
from .base import (
    _STREAM_FOLDER_AUGMENT,
    _STREAM_FOLDER_PERM,
    _STREAM_MIX,
    _STREAM_ORDER,
    _STREAM_RANDAUGMENT,
    CROP_PADDING,
    IMAGE_SIZE,
    DataConfig,
    Dataset,
    FolderDataset,
    Splits,
    _derive_seed,
    _torch_generator,
)


def steps_per_epoch(splits: Splits, cfg: DataConfig) -> int:
    """Training batches per epoch (the incomplete last batch is dropped, so every batch has one shape)."""
    steps = len(splits.train) // cfg.batch_size
    if steps == 0:
        raise ConfigError(
            f"data.batch_size={cfg.batch_size} is larger than the training split ({len(splits.train)} images)"
        )
    return steps


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..world_size-1 and world_size >= 1, got rank={rank}, "
                          f"world_size={world_size}")


def _shard_size(cfg: DataConfig, rank: int, world_size: int) -> int:
    _check_rank(rank, world_size)
    if cfg.batch_size % world_size:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is not divisible by the world size {world_size}")
    return cfg.batch_size // world_size


def _eval_ranges(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Rank `rank`'s [lo, hi) of each global evaluation batch (sizes differ by at most one; empty ones dropped)."""
    ranges = []
    for start in range(0, n, batch_size):
        base, extra = divmod(min(batch_size, n - start), world_size)
        lo = start + rank * base + min(rank, extra)
        hi = lo + base + (rank < extra)
        if hi > lo:
            ranges.append((lo, hi))
    return ranges


# --------------------------------------------------------------------------------------------------
# In-memory data


def _in_memory_train_batches(
    splits: Splits, cfg: DataConfig, seed: int, epoch: int, device: torch.device | str, augment: bool,
    rank: int, world_size: int,
) -> Iterator[dict[str, Tensor]]:
    train, batch_size = splits.train, cfg.batch_size
    steps = steps_per_epoch(splits, cfg)
    shard = batch_size // world_size
    own = torch.arange(rank * shard, (rank + 1) * shard)  # this rank's positions in the global batch
    mean, std = _stats_on(splits, device)
    generator = _torch_generator(seed, epoch, _STREAM_ORDER)  # order, crops, flips, mixing permutation
    mix_rng = np.random.default_rng(_derive_seed(seed, epoch, _STREAM_MIX))  # Beta draws, box centres
    mixing = augment and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
    order = torch.randperm(len(train), generator=generator)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]  # the global batch
        rows = own  # the positions this rank augments: its own, and below the partners they are mixed with
        if augment:
            top = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size,), generator=generator)
            left = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size,), generator=generator)
            flip = torch.rand(batch_size, generator=generator) < 0.5
            if cfg.randaugment_n > 0:
                randaugment_generator = _torch_generator(seed, epoch, step, _STREAM_RANDAUGMENT)
                randaugment = draw_randaugment(batch_size, cfg.randaugment_n, cfg.randaugment_m, IMAGE_SIZE,
                                               IMAGE_SIZE, randaugment_generator)
            # Drawn whether or not mixing is on, so toggling mixing leaves later crops and flips unchanged.
            perm = torch.randperm(batch_size, generator=generator)
            mix = draw_mix(mix_rng, cfg, IMAGE_SIZE)
            if mixing:
                rows = torch.cat([own, perm[own]]).unique()  # sorted

        images = train.images[index[rows]]  # uint8 (R, 3, 32, 32)
        if augment:
            images = crop_flip(images, top[rows], left[rows], flip[rows])
            if cfg.randaugment_n > 0:
                images = apply_randaugment(images, randaugment, cfg.randaugment_m, rows)
        x = _normalize(images.to(device, non_blocking=True), mean, std)
        y_a = train.labels[index[own]].to(device, non_blocking=True)
        y_b, lam = y_a, 1.0
        if mixing:
            row_of = torch.full((batch_size,), -1, dtype=torch.int64)
            row_of[rows] = torch.arange(len(rows))
            own_rows = row_of[own]
            perm_rows = torch.arange(len(rows))  # rows that are only partners mix with themselves, unused
            perm_rows[own_rows] = row_of[perm[own]]
            x, lam = mix_batch(x, perm_rows.to(device, non_blocking=True), mix)
            if len(rows) > len(own):
                x = x[own_rows.to(device, non_blocking=True)]
            y_b = train.labels[index[perm[own]]].to(device, non_blocking=True)
        yield {
            "x": x,
            "y_a": y_a,
            "y_b": y_b,
            "lam": torch.tensor(lam, dtype=torch.float32, device=device),
            "index": index[own].to(device, non_blocking=True),
        }


def _in_memory_eval_batches(
    data: Dataset, splits: Splits, cfg: DataConfig, device: torch.device | str, rank: int, world_size: int
) -> Iterator[dict[str, Tensor]]:
    mean, std = _stats_on(splits, device)
    one = torch.tensor(1.0, dtype=torch.float32, device=device)
    for start, stop in _eval_ranges(len(data), cfg.eval_batch_size, rank, world_size):
        y = data.labels[start:stop].to(device, non_blocking=True)
        yield {
            "x": _normalize(data.images[start:stop].to(device, non_blocking=True), mean, std),
            "y_a": y,
            "y_b": y,
            "lam": one,
            "index": torch.arange(start, stop, device=device),
        }


# --------------------------------------------------------------------------------------------------
# Folder data


def _folder_train_batches(
    splits: Splits, cfg: DataConfig, seed: int, epoch: int, device: torch.device | str, augment: bool,
    rank: int, world_size: int,
) -> Iterator[dict[str, Tensor]]:
    train, batch_size = splits.train, cfg.batch_size
    steps = steps_per_epoch(splits, cfg)
    shard = batch_size // world_size
    first = rank * shard
    mean, std = _stats_on(splits, device)
    order = torch.randperm(len(train), generator=_torch_generator(seed, epoch, _STREAM_ORDER))
    # Each image's augmentation seed follows its slot in the epoch's global order (see kd.data.folder).
    epoch_seed = _derive_seed(seed, epoch, _STREAM_FOLDER_AUGMENT) if augment else -1
    requests = (
        [(position, epoch_seed, step * batch_size + first + j)
         for j, position in enumerate(order[step * batch_size + first : step * batch_size + first + shard].tolist())]
        for step in range(steps)
    )
    perm_generator = _torch_generator(seed, epoch, _STREAM_FOLDER_PERM)
    mix_rng = np.random.default_rng(_derive_seed(seed, epoch, _STREAM_MIX))
    mixing = augment and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)
    pin_memory = torch.device(device).type == "cuda"
    for images, labels, index in folder.decoded_batches(train, requests, cfg, train=augment, pin_memory=pin_memory):
        x = _normalize(images.to(device, non_blocking=True), mean, std)
        y_a = labels.to(device, non_blocking=True)
        y_b, lam = y_a, 1.0
        if mixing:
            perm = torch.randperm(batch_size, generator=perm_generator)
            perm = perm[(perm >= first) & (perm < first + shard)] - first  # the global one, kept to the shard
            perm = perm.to(device, non_blocking=True)
            x, lam = mix_batch(x, perm, draw_mix(mix_rng, cfg, cfg.image_size))
            y_b = y_a[perm]
        yield {
            "x": x,
            "y_a": y_a,
            "y_b": y_b,
            "lam": torch.tensor(lam, dtype=torch.float32, device=device),
            "index": index.to(device, non_blocking=True),
        }


def _folder_eval_batches(
    data: FolderDataset, splits: Splits, cfg: DataConfig, device: torch.device | str, rank: int, world_size: int
) -> Iterator[dict[str, Tensor]]:
    mean, std = _stats_on(splits, device)
    one = torch.tensor(1.0, dtype=torch.float32, device=device)
    requests = [[(p, -1, p) for p in range(lo, hi)] for lo, hi in _eval_ranges(len(data), cfg.eval_batch_size, rank,
                                                                                  world_size)]
    pin_memory = torch.device(device).type == "cuda"
    for images, labels, index in folder.decoded_batches(data, requests, cfg, train=False, pin_memory=pin_memory):
        y = labels.to(device, non_blocking=True)
        yield {
            "x": _normalize(images.to(device, non_blocking=True), mean, std),
            "y_a": y,
            "y_b": y,
            "lam": one,
            "index": index.to(device, non_blocking=True),
        }


# --------------------------------------------------------------------------------------------------
# Prefetch and the public iterators


_END = object()


class _ProducerError:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prefetched(make_batches: Callable[[], Iterator[dict[str, Tensor]]], depth: int = 2) -> Iterator[dict[str, Tensor]]:
    """Run the batch iterator in a background thread, at most `depth` finished batches ahead. The thread
    stops when the consumer stops iterating (break, exception, garbage collection)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in make_batches():
                if not put(batch):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            put(_ProducerError(error))

    thread = threading.Thread(target=produce, name="kd-data-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, _ProducerError):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def _threaded(data: Dataset | FolderDataset, cfg: DataConfig) -> bool:
    """Prefetch in a background thread, except folder images decoded in the calling process: their
    augmentation seeds the global RNG around each image, which would race with the caller's own draws."""
    return cfg.prefetch and not (isinstance(data, FolderDataset) and cfg.workers == 0)


def train_batches(
    splits: Splits,
    cfg: DataConfig,
    *,
    seed: int,
    epoch: int,
    device: torch.device | str = "cpu",
    augment: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Tensor]]:
    """One epoch of shuffled training batches, `steps_per_epoch` of them, all of shape
    (batch_size // world_size, ...): rank `rank`'s shard of each global batch. A pure function of
    (seed, epoch, splits, cfg, rank, world_size). `augment=False` keeps the shuffle but applies no crop,
    flip, RandAugment or mixing (folder data: the evaluation resize and centre crop)."""
    steps_per_epoch(splits, cfg)  # a batch size larger than the split fails here, not in the thread
    _shard_size(cfg, rank, world_size)
    build = _folder_train_batches if isinstance(splits.train, FolderDataset) else _in_memory_train_batches
    make = lambda: build(splits, cfg, seed, epoch, device, augment, rank, world_size)  # noqa: E731
    return _prefetched(make) if _threaded(splits.train, cfg) else make()


def eval_batches(
    data: Dataset | FolderDataset,
    splits: Splits,
    cfg: DataConfig,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, Tensor]]:
    """Every image of `data` once, in order, in batches of eval_batch_size (the last may be smaller);
    no augmentation, lam = 1, y_b = y_a, index = position in `data`. With world_size > 1, rank `rank`'s
    near-equal share of each batch: the ranks together see every image exactly once (sum their counts)."""
    _check_rank(rank, world_size)
    build = _folder_eval_batches if isinstance(data, FolderDataset) else _in_memory_eval_batches
    make = lambda: build(data, splits, cfg, device, rank, world_size)  # noqa: E731
    return _prefetched(make) if _threaded(data, cfg) else make()
