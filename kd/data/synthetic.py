"""Synthetic: a procedural, learnable 32x32 RGB set built into the code (quickstart and tests).

A class is a (shape, stripe orientation, hue) triple. Classes come in pairs that share a hue and
differ in shape, and the background colour is random, so the mean colour of an image narrows the class
down to about a pair but cannot tell the pair apart: a model has to see the shape (distillation then
has dark knowledge to pass on: the confusable partner). Per image: random position, scale, rotation,
stripe phase and period, colour jitter and pixel noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import IMAGE_SIZE, Dataset, _torch_generator

# The synthetic set is a fixed dataset: its pixels do not depend on the run seed (only the split does).
_SYNTHETIC_DATA_SEED, _SYNTHETIC_CHUNK = 20240917, 512

_SHAPES = ("disk", "square", "triangle", "ring", "cross", "diamond")
_STRIPE_ANGLES = 4  # 0, 45, 90, 135 degrees


def _shape_masks(u: Tensor, v: Tensor) -> Tensor:
    """(len(_SHAPES), N, H, W) bool: each shape in unit-radius coordinates (u, v)."""
    radius = torch.sqrt(u * u + v * v)
    return torch.stack([
        radius <= 1.0,
        torch.maximum(u.abs(), v.abs()) <= 0.8,
        (v <= 0.5) & (math.sqrt(3.0) * u.abs() - v <= 1.0),
        (radius >= 0.55) & (radius <= 1.0),
        ((u.abs() <= 0.3) & (v.abs() <= 1.0)) | ((v.abs() <= 0.3) & (u.abs() <= 1.0)),
        u.abs() + v.abs() <= 1.0,
    ])


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """(N,) each in [0, 1] -> (N, 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6.0) % 6.0
    return value[:, None] - value[:, None] * saturation[:, None] * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def _render_synthetic(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    n = labels.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    structure = labels % (len(_SHAPES) * _STRIPE_ANGLES)
    shape_id = structure % len(_SHAPES)
    stripe_angle = (structure // len(_SHAPES)) * (math.pi / _STRIPE_ANGLES)
    hue_groups = (num_classes + 1) // 2
    class_hue = (labels // 2).float() / hue_groups

    foreground = _hsv_to_rgb(
        (class_hue + 0.03 * torch.randn(n, generator=generator)) % 1.0, uniform(0.55, 1.0), uniform(0.6, 1.0)
    )
    background = _hsv_to_rgb(uniform(0.0, 1.0), uniform(0.0, 0.35), uniform(0.05, 0.55))

    centre_y, centre_x = 16.0 + uniform(-6.0, 6.0), 16.0 + uniform(-6.0, 6.0)
    radius = 9.0 * uniform(0.7, 1.3)
    rotation = uniform(-0.35, 0.35)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    dy = coords[None, :, None] - centre_y[:, None, None]  # (N, H, 1)
    dx = coords[None, None, :] - centre_x[:, None, None]  # (N, 1, W)
    cos, sin = torch.cos(rotation)[:, None, None], torch.sin(rotation)[:, None, None]
    r = radius[:, None, None]
    u, v = (cos * dx + sin * dy) / r, (cos * dy - sin * dx) / r  # (N, H, W)
    masks = _shape_masks(u, v)  # (S, N, H, W)
    mask = masks.gather(0, shape_id[None, :, None, None].expand(1, n, IMAGE_SIZE, IMAGE_SIZE))[0]

    along = dx * torch.cos(stripe_angle)[:, None, None] + dy * torch.sin(stripe_angle)[:, None, None]
    phase = uniform(0.0, 2.0 * math.pi)[:, None, None]
    stripes = torch.sin(2.0 * math.pi * along / uniform(3.5, 5.5)[:, None, None] + phase) > 0
    shade = torch.where(stripes, 1.0, 0.55)  # (N, H, W)

    image = torch.where(
        mask[:, None], foreground[:, :, None, None] * shade[:, None], background[:, :, None, None]
    )  # (N, 3, H, W)
    image = image + 0.04 * torch.randn(image.shape, generator=generator)
    return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def make_synthetic(size: int, num_classes: int, part: int) -> Dataset:
    """`size` images of the synthetic set, balanced classes. Rendered in fixed chunks with their own seeds,
    so image i is the same whatever `size` is; `part` (0 train pool, 1 test) selects disjoint streams."""
    labels = torch.arange(size, dtype=torch.int64) % num_classes
    chunks = [torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)]
    for start in range(0, size, _SYNTHETIC_CHUNK):
        # Always a whole chunk (the draws depend on its length), cut to size afterwards.
        chunk_labels = torch.arange(start, start + _SYNTHETIC_CHUNK, dtype=torch.int64) % num_classes
        generator = _torch_generator(_SYNTHETIC_DATA_SEED, num_classes, part, start)
        chunks.append(_render_synthetic(chunk_labels, num_classes, generator)[: size - start])
    return Dataset(torch.cat(chunks), labels)
