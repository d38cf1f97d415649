"""Augmentation primitives, pure functions of explicit parameters (the random draws happen in the caller or
in the `draw_*` functions here, from generators the caller passes), and the batch-level mixing that both
the in-memory and the folder pipelines apply after loading."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import CROP_PADDING, RANDAUGMENT_BINS, DataConfig, Splits


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = CROP_PADDING) -> Tensor:
    """Crop each image of (N, C, H, W) at (top, left) out of its zero-padded copy, then mirror it where
    `flip`; top and left are in 0..2*padding (padding = no shift)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
    # Every crop position as a view, (N, C, 2p + 1, 2p + 1, H, W); one gather picks each image's own.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    cropped = windows[torch.arange(n), :, top, left]  # (N, C, H, W)
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


# --------------------------------------------------------------------------------------------------
# RandAugment

_RANDAUGMENT_CACHE: dict[tuple[int, int, int], tuple[object, list[tuple[str, float | None, bool]]]] = {}

# Per slot (0..num_ops-1): {(op name, signed magnitude): positions of the images that drew it, ascending}.
RandAugmentDraws = list[dict[tuple[str, float], list[int]]]


def _randaugment_ops(magnitude: int, height: int, width: int) -> tuple[object, list[tuple[str, float | None, bool]]]:
    """torchvision's RandAugment and its op table [(name, magnitude or None, signed)] at magnitude M."""
    key = (magnitude, height, width)
    if key not in _RANDAUGMENT_CACHE:
        from torchvision.transforms import v2

        transform = v2.RandAugment(num_ops=1, magnitude=magnitude, num_magnitude_bins=RANDAUGMENT_BINS)
        table = []
        for name, (magnitudes_fn, signed) in transform._AUGMENTATION_SPACE.items():
            magnitudes = magnitudes_fn(RANDAUGMENT_BINS, height, width)
            table.append((name, None if magnitudes is None else float(magnitudes[magnitude]), signed))
        _RANDAUGMENT_CACHE[key] = (transform, table)
    return _RANDAUGMENT_CACHE[key]


def draw_randaugment(n: int, num_ops: int, magnitude: int, height: int, width: int,
                     generator: torch.Generator) -> RandAugmentDraws:
    """The ops of `n` images, drawn in torchvision's order image by image (op index, then the sign of a
    signed op), grouped by (slot, op, magnitude)."""
    _, table = _randaugment_ops(magnitude, height, width)
    groups: RandAugmentDraws = [{} for _ in range(num_ops)]
    for i in range(n):
        for slot in range(num_ops):
            name, value, signed = table[int(torch.randint(len(table), (), generator=generator))]
            op_magnitude = 0.0
            if value is not None:
                op_magnitude = value
                if signed and torch.rand((), generator=generator) <= 0.5:
                    op_magnitude = -value
            groups[slot].setdefault((name, op_magnitude), []).append(i)
    return groups


def apply_randaugment(images: Tensor, draws: RandAugmentDraws, magnitude: int, rows: Tensor | None = None) -> Tensor:
    """Apply drawn ops to uint8 (R, C, H, W) images: image k is drawn position `rows[k]` (rows ascending;
    None = images are all the drawn positions). The images that drew the same (op, magnitude) in the same
    slot are transformed as one batch through torchvision's own op code; each image's result does not
    depend on which others are in the batch, so a data-parallel rank can transform only its own images."""
    _, _, height, width = images.shape
    transform, _ = _randaugment_ops(magnitude, height, width)
    out = images.clone()
    for slot_groups in draws:
        for (name, op_magnitude), members in slot_groups.items():
            if name == "Identity":
                continue
            index = torch.tensor(members)
            if rows is not None:
                index = torch.isin(rows, index).nonzero().flatten()
                if index.numel() == 0:
                    continue
            out[index] = transform._apply_image_or_video_transform(
                out[index], name, op_magnitude, interpolation=transform.interpolation, fill=transform._fill
            )
    return out


def rand_augment(images: Tensor, num_ops: int, magnitude: int, generator: torch.Generator) -> Tensor:
    """torchvision's v2.RandAugment(num_ops, magnitude) applied to each uint8 image of (N, C, H, W)
    independently, drawing from `generator` instead of the global RNG.

    The draws follow torchvision's order image by image, so with a generator seeded like the global RNG the
    result equals `v2.RandAugment` called on each image in turn (tested), and grouped ops run batched,
    several times faster than a per-image loop. Uses v2.RandAugment's `_AUGMENTATION_SPACE` and
    `_apply_image_or_video_transform` (unchanged since torchvision 0.15): the only way to keep its op table
    and code while drawing from our own generator.
    """
    n, _, height, width = images.shape
    return apply_randaugment(images, draw_randaugment(n, num_ops, magnitude, height, width, generator), magnitude)


# --------------------------------------------------------------------------------------------------
# Mixup and CutMix


def mixup(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    """lam * x + (1 - lam) * x[perm]."""
    return x * lam + x[perm] * (1.0 - lam)


def cutmix_box(lam0: float, centre_y: int, centre_x: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The CutMix box (y1, y2, x1, x2): sides round(sqrt(1 - lam0) * size), so about (1 - lam0) of the
    image, centred at (centre_y, centre_x) and clipped to the image (the pasted area can then be smaller)."""
    cut = math.sqrt(1.0 - lam0)
    box_h, box_w = round(height * cut), round(width * cut)
    y1, x1 = centre_y - box_h // 2, centre_x - box_w // 2
    return max(y1, 0), min(y1 + box_h, height), max(x1, 0), min(x1 + box_w, width)


def cutmix(x: Tensor, perm: Tensor, box: tuple[int, int, int, int]) -> tuple[Tensor, float]:
    """Paste box of x[perm] into x; returns the mixed batch and lam = the fraction of x that was kept."""
    y1, y2, x1, x2 = box
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    kept = 1.0 - (y2 - y1) * (x2 - x1) / (x.shape[-2] * x.shape[-1])
    return mixed, kept


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing draws: which of mixup / CutMix, their Beta draws and the CutMix box centre."""

    cutmix: bool
    lam_mixup: float
    lam_cutmix: float
    centre_y: int
    centre_x: int


def draw_mix(rng: np.random.Generator, cfg: DataConfig, image_size: int) -> MixDraw:
    """The draws of one training batch (made whether or not mixing is on, in a fixed order)."""
    use_mixup, use_cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    choose_cutmix = rng.random() < cfg.cutmix_prob if (use_mixup and use_cutmix) else use_cutmix
    lam_mixup = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)) if use_mixup else 1.0
    lam_cutmix = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha)) if use_cutmix else 1.0
    centre_y, centre_x = (int(c) for c in rng.integers(0, image_size, size=2))
    return MixDraw(bool(choose_cutmix), lam_mixup, lam_cutmix, centre_y, centre_x)


def mix_batch(x: Tensor, perm: Tensor, draw: MixDraw) -> tuple[Tensor, float]:
    """Mixup or CutMix of the normalised batch x (B, C, H, W) with x[perm]; returns (mixed, lam)."""
    if draw.cutmix:
        return cutmix(x, perm, cutmix_box(draw.lam_cutmix, draw.centre_y, draw.centre_x, x.shape[-2], x.shape[-1]))
    return mixup(x, perm, draw.lam_mixup), draw.lam_mixup


# --------------------------------------------------------------------------------------------------
# Normalisation


def _normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised; mean/std (1, 3, 1, 1) on the images' device."""
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def _stats_on(splits: Splits, device: torch.device | str) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(splits.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std
