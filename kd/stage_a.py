"""IB-KD's stage-A data: the frozen networks' outputs cached once, and the shuffled batches read from them.

The teachers are frozen for the whole run, so their pooled features and logits are computed once per image
and view (:func:`build_cache`); the student is frozen for the whole of one stage A, so its logits and pooled
feature are computed once per stage A on the same images and views (:func:`add_student`). Stage A then
trains the MBM on batches of cached tensors (:func:`cached_batches`), never running a network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import DataConfig, Dataset, Splits, crop_flip, eval_batches
from .distributed import sum_across_ranks, world
from .errors import ConfigError
from .modeling import Net
from .step import apply_model


def augmented_view(data: Dataset, view: int, seed: int) -> Dataset:
    """View 0 is the image itself; view v > 0 a seeded random crop (pad 4) + flip of every image."""
    if view == 0:
        return data
    generator = torch.Generator().manual_seed(seed * 100_003 + view)
    n = len(data.labels)
    top = torch.randint(0, 9, (n,), generator=generator)
    left = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return Dataset(crop_flip(data.images, top, left, flip), data.labels)


@dataclass
class FeatureCache:
    """One split's cached outputs, stacked over views: ``pooled[t][v, i]`` is teacher t's (C_t,) pooled feature
    of image i in view v, ``logits[t][v, i]`` its logits; the frozen student's alike once :func:`add_student`
    has run (None before)."""

    pooled: list[Tensor]  # per teacher (V, N, C_t)
    logits: list[Tensor]  # per teacher (V, N, K)
    labels: Tensor  # (N,)
    data: Dataset
    seed: int
    student_pooled: Tensor | None = None  # (V, N, C_s)
    student_logits: Tensor | None = None  # (V, N, K)

    @property
    def views(self) -> int:
        return self.pooled[0].shape[0]

    def view(self, v: int = 0) -> dict[str, Tensor]:
        """Every cached tensor of view ``v`` (the keys of a stage-A batch, all images)."""
        out = {"f1": self.pooled[0][v], "f2": self.pooled[1][v], "y_a": self.labels}
        if self.student_pooled is not None:
            out.update(s_pooled=self.student_pooled[v], s_logits=self.student_logits[v])
        return out


def _forward_views(nets: list[Net], data: Dataset, splits: Splits, data_cfg: DataConfig, *, views: int, seed: int,
                   device: torch.device, channels_last: bool) -> list[tuple[Tensor, Tensor]]:
    """``[(pooled (V, N, C), logits (V, N, K)), ...]`` of each network in eval mode, no gradient. In a
    data-parallel job each rank runs its shard and the ranks' pieces are summed into the whole."""
    rank, size = world().rank, world().size
    n = len(data.labels)
    out = None
    for view in range(views):
        for batch in eval_batches(augmented_view(data, view, seed), splits, data_cfg, device=device, rank=rank,
                                  world_size=size):
            x = batch["x"].contiguous(memory_format=torch.channels_last) if channels_last else batch["x"]
            index = batch["index"].to(device)
            with torch.no_grad():
                results = [apply_model(net.eval_skeleton, net.params, net.buffers, x, train=False)[:2] for net in nets]
            if out is None:
                out = [(torch.zeros(views, n, feats["pooled"].shape[1], device=device),
                        torch.zeros(views, n, logits.shape[1], device=device)) for logits, feats in results]
            for (pooled, logit_store), (logits, feats) in zip(out, results):
                pooled[view, index] = feats["pooled"].float()
                logit_store[view, index] = logits.float()
    return [(sum_across_ranks(p), sum_across_ranks(l)) for p, l in out]


def build_cache(teachers: list[Net], data: Dataset, splits: Splits, data_cfg: DataConfig, *, views: int, seed: int,
                device: torch.device, channels_last: bool = False) -> FeatureCache:
    """The teachers' pooled features and logits for every image of ``data`` and view."""
    outputs = _forward_views(teachers, data, splits, data_cfg, views=views, seed=seed, device=device,
                             channels_last=channels_last)
    return FeatureCache([p for p, _ in outputs], [l for _, l in outputs], data.labels.to(device), data, seed)


def add_student(cache: FeatureCache, student: Net, params, buffers, splits: Splits, data_cfg: DataConfig, *,
                device: torch.device, channels_last: bool = False) -> None:
    """The frozen student's (eval mode) pooled features and logits on the cache's images and views."""
    frozen = Net(student.arch, student.num_classes, student.train_skeleton, student.eval_skeleton, params, buffers)
    [(cache.student_pooled, cache.student_logits)] = _forward_views(
        [frozen], cache.data, splits, data_cfg, views=cache.views, seed=cache.seed, device=device,
        channels_last=channels_last)


def cached_batches(cache: FeatureCache, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1):
    """Shuffled stage-A batches; each image's view is drawn per epoch (seeded). With ``world_size`` > 1,
    ``rank``'s contiguous ``batch_size / world_size`` shard of every global batch."""
    if batch_size % world_size:
        raise ConfigError(f"stage_a.batch_size={batch_size} is not divisible by the {world_size} ranks")
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    n = len(cache.labels)
    order = torch.randperm(n, generator=generator)
    views = torch.randint(0, cache.views, (n,), generator=generator)
    device = cache.labels.device
    shard = batch_size // world_size
    for start in range(0, n - batch_size + 1, batch_size):
        start += rank * shard
        index = order[start:start + shard].to(device)
        view = views[start:start + shard].to(device)
        y = cache.labels[index]
        batch = {"f1": cache.pooled[0][view, index], "f2": cache.pooled[1][view, index], "y_a": y, "y_b": y,
                 "lam": torch.ones((), device=device)}
        if cache.student_pooled is not None:
            batch.update(s_pooled=cache.student_pooled[view, index], s_logits=cache.student_logits[view, index])
        yield batch


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).sum()) / max(1, len(labels))
