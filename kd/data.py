"""Datasets, splits, augmentation and batching.

Every split lives in memory as uint8 (N, 3, 32, 32) images and int64 labels. A training batch is a pure
function of (seed, epoch, data, config): shuffling, crops, flips and the mixing permutation come from a
`torch.Generator`, the mixing coefficients from a numpy generator (torch has no generator-aware Beta), and
RandAugment from its own generator per (seed, epoch, batch), so the caller's global RNG is never touched
and a background prefetch thread cannot race with it.

A batch is a dict:
    x      float32 (B, 3, 32, 32), normalised with the dataset's mean/std
    y_a    int64 (B,)
    y_b    int64 (B,)   the second target of a mixed batch (= y_a when nothing is mixed)
    lam    float32 0-d  the weight of y_a (1.0 when nothing is mixed)
    index  int64 (B,)   positions of the images in the split they came from (splits.train for training)
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32
CROP_PADDING = 4
RANDAUGMENT_BINS = 31  # torchvision's default number of magnitude bins; magnitude M indexes into them

CIFAR_DEFAULT_ROOT = "data"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_APT = "dataset-fashion-mnist"

# Independent random streams derived from the run seed.
_STREAM_SPLIT, _STREAM_ORDER, _STREAM_MIX, _STREAM_RANDAUGMENT = 11, 12, 13, 14
# The synthetic set is a fixed dataset: its pixels do not depend on the run seed (only the split does).
_SYNTHETIC_DATA_SEED, _SYNTHETIC_CHUNK = 20240917, 512


@dataclass(frozen=True)
class DataConfig:
    name: Literal["cifar100", "cifar10", "fashion_mnist", "synthetic"] = "cifar100"
    """Dataset. `synthetic` is a small procedural set built into the code (quickstart and tests)."""
    root: str = ""
    """Where the dataset lives ("" = its default: ./data for CIFAR, downloaded there when absent;
    /usr/share/datasets/fashion-mnist for Fashion-MNIST)."""
    val_size: int = 5000
    """Images held out of the training set for validation (seeded split; the test set is untouched)."""
    split_seed: int = 0
    """Seed of the validation split. Fixed by default so that teachers and the students of every run seed
    hold out the same images (no teacher has trained on a student's validation set); -1 = the run seed."""
    train_subset: int = 0
    """Train on only the first N images of the shuffled remaining training set (0 = all; budgeted runs)."""
    batch_size: int = 128
    """Training batch size (the last incomplete batch of an epoch is dropped)."""
    eval_batch_size: int = 512
    """Batch size for validation and test."""
    randaugment_n: int = 0
    """RandAugment operations per image (0 turns RandAugment off)."""
    randaugment_m: int = 9
    """RandAugment magnitude, 0..30."""
    mixup_alpha: float = 0.0
    """Mixup Beta(a, a) parameter (0 = off)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(a, a) parameter (0 = off)."""
    cutmix_prob: float = 0.5
    """When mixup and CutMix are both on: probability that a batch uses CutMix (one of them per batch)."""
    synthetic_size: int = 2000
    """Training images of the synthetic set (validation comes on top; the test set has a quarter of this)."""
    synthetic_classes: int = 10
    """Classes of the synthetic set."""
    prefetch: bool = True
    """Build the next batches in a background thread while the caller trains."""

    def __post_init__(self) -> None:
        if self.name not in ("cifar100", "cifar10", "fashion_mnist", "synthetic"):
            raise ValueError(f"data.name must be cifar100, cifar10, fashion_mnist or synthetic, got {self.name!r}")
        for field in ("val_size", "train_subset", "randaugment_n"):
            if getattr(self, field) < 0:
                raise ValueError(f"data.{field} must be >= 0, got {getattr(self, field)}")
        for field in ("batch_size", "eval_batch_size", "synthetic_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"data.{field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.randaugment_m < RANDAUGMENT_BINS:
            raise ValueError(f"data.randaugment_m must be in 0..{RANDAUGMENT_BINS - 1}, got {self.randaugment_m}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("data.mixup_alpha and data.cutmix_alpha must be >= 0")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ValueError(f"data.cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if self.synthetic_classes < 2:
            raise ValueError(f"data.synthetic_classes must be >= 2, got {self.synthetic_classes}")


@dataclass(frozen=True)
class Dataset:
    """One split, in memory."""

    images: Tensor  # uint8 (N, 3, 32, 32)
    labels: Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be uint8 (N, 3, 32, 32), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    mean: tuple[float, float, float]  # per channel, in [0, 1] units, over the whole original training set
    std: tuple[float, float, float]
    name: str
    synthetic: bool
    description: str  # one line for logs and reports, e.g. "synthetic (procedural, 10 classes; ...)"


# --------------------------------------------------------------------------------------------------
# Seeds


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed that mixes all parts (SeedSequence hashing: nearby seeds give unrelated streams)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def _torch_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(*parts))


# --------------------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle format)

_CIFAR = {
    "cifar100": dict(
        title="CIFAR-100",
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key="fine_labels",
        num_classes=100,
        tv_class="CIFAR100",
    ),
    "cifar10": dict(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key="labels",
        num_classes=10,
        tv_class="CIFAR10",
    ),
}


def _unpickle(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    # The original files were pickled by Python 2 (str keys under latin1); re-pickled ones have bytes keys.
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}


def _read_cifar_files(paths: list[Path], label_key: str) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for path in paths:
        entry = _unpickle(path)
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _read_cifar(name: str, root: str) -> tuple[Dataset, Dataset]:
    spec = _CIFAR[name]
    root_dir = Path(root or CIFAR_DEFAULT_ROOT).expanduser().resolve()
    folder = root_dir / spec["folder"]
    needed = [*spec["train"], spec["test"], spec["meta"]]
    if not all((folder / f).is_file() for f in needed):
        _download_cifar(name, root_dir)
    label_key = spec["label_key"]
    train = Dataset(*_read_cifar_files([folder / f for f in spec["train"]], label_key))
    test = Dataset(*_read_cifar_files([folder / spec["test"]], label_key))
    return train, test


def _download_cifar(name: str, root_dir: Path) -> None:
    import torchvision.datasets as tv_datasets
    from torchvision.datasets import utils as tv_utils

    spec = _CIFAR[name]
    tv_class = getattr(tv_datasets, spec["tv_class"])
    folder = root_dir / spec["folder"]
    files = ", ".join(f"`{f}`" for f in [*spec["train"], spec["test"], spec["meta"]])
    try:
        root_dir.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(
            tv_class.url, str(root_dir), filename=tv_class.filename, md5=tv_class.tgz_md5
        )
        missing = [f for f in [*spec["train"], spec["test"], spec["meta"]] if not (folder / f).is_file()]
        if missing:
            raise RuntimeError(f"the archive did not contain {missing}")
    except Exception as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise FileNotFoundError(
            f"{spec['title']} is missing and could not be downloaded ({reason}); put {files} in {folder}/ "
            f"(extract {tv_class.url} into {root_dir}/) or pass --data.root DIR where DIR/{spec['folder']}/ has them"
        ) from error


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (the original IDX files)

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then the
    # dimensions as big-endian int32.
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (header {raw[:4].hex()})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def _fashion_to_rgb32(images: np.ndarray) -> Tensor:
    grey = torch.from_numpy(images.copy())  # (N, 28, 28)
    pad = (IMAGE_SIZE - grey.shape[-1]) // 2
    padded = F.pad(grey, (pad, pad, pad, pad))  # (N, 32, 32), zero border
    return padded[:, None].expand(-1, 3, -1, -1).contiguous()


def _read_fashion_mnist(root: str) -> tuple[Dataset, Dataset]:
    candidates = [Path(root).expanduser(), Path(root).expanduser() / "fashion-mnist"] if root else []
    candidates.append(Path(FASHION_MNIST_DIR))
    for directory in candidates:
        paths = {key: _find_idx(directory, stem) for key, stem in _FASHION_FILES.items()}
        if all(paths.values()):
            break
    else:
        looked = ", ".join(str(d.resolve()) for d in candidates)
        files = ", ".join(f"{stem}.gz" for stem in _FASHION_FILES.values())
        raise FileNotFoundError(
            f"Fashion-MNIST is missing: put {files} in {FASHION_MNIST_DIR} (`apt-get install -y {FASHION_MNIST_APT}` "
            f"does that) or in --data.root (looked in: {looked})"
        )
    splits = []
    for part in ("train", "test"):
        images = _read_idx(paths[f"{part}_images"], ndim=3)
        labels = _read_idx(paths[f"{part}_labels"], ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"Fashion-MNIST {part}: {images.shape[0]} images but {labels.shape[0]} labels")
        splits.append(Dataset(_fashion_to_rgb32(images), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------------------
# Synthetic: a procedural, learnable 32x32 RGB set
#
# A class is a (shape, stripe orientation, hue) triple. Classes come in pairs that share a hue and
# differ in shape, and the background colour is random, so the mean colour of an image narrows the class
# down to about a pair but cannot tell the pair apart: a model has to see the shape (distillation then
# has dark knowledge to pass on: the confusable partner). Per image: random position, scale, rotation,
# stripe phase and period, colour jitter and pixel noise.

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


# --------------------------------------------------------------------------------------------------
# Splits


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, from a 256-bin histogram per channel: exact, and ten
    times faster than a float pass over CIFAR's 150M values."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        mean = (counts * levels).sum() / counts.sum()
        variance = (counts * (levels - mean).square()).sum() / counts.sum()
        means.append(float(mean))
        stds.append(float(variance.clamp_min(1e-12).sqrt()))
    return tuple(means), tuple(stds)


def _take(data: Dataset, index: Tensor) -> Dataset:
    return Dataset(data.images[index], data.labels[index])


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Train / validation / test splits of `cfg.name`. Validation is held out of the training set by a
    permutation seeded from `cfg.split_seed` (or `seed` when that is -1); `train_subset` then keeps the
    first N shuffled remaining images."""
    if cfg.name in _CIFAR:
        pool, test = _read_cifar(cfg.name, cfg.root)
        num_classes, title = _CIFAR[cfg.name]["num_classes"], _CIFAR[cfg.name]["title"]
    elif cfg.name == "fashion_mnist":
        pool, test = _read_fashion_mnist(cfg.root)
        num_classes, title = 10, "Fashion-MNIST (grey 28x28 replicated to RGB, zero-padded to 32x32)"
    else:
        # The validation images come on top of `synthetic_size`, so the training split has exactly that many.
        pool = make_synthetic(cfg.synthetic_size + cfg.val_size, cfg.synthetic_classes, part=0)
        test = make_synthetic(max(1, cfg.synthetic_size // 4), cfg.synthetic_classes, part=1)
        num_classes, title = cfg.synthetic_classes, f"synthetic (procedural, {cfg.synthetic_classes} classes)"

    if cfg.val_size >= len(pool):
        raise ValueError(f"data.val_size={cfg.val_size} leaves no training images ({title} has {len(pool)})")
    split_seed = seed if cfg.split_seed < 0 else cfg.split_seed
    order = torch.randperm(len(pool), generator=_torch_generator(split_seed, _STREAM_SPLIT))
    val_index, train_index = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.train_subset:
        if cfg.train_subset > len(train_index):
            raise ValueError(
                f"data.train_subset={cfg.train_subset} exceeds the {len(train_index)} training images left "
                f"after holding out {cfg.val_size} for validation"
            )
        train_index = train_index[: cfg.train_subset]
    # Sorted so the splits keep the files' order; which images they hold is all the seed decides.
    train, val = _take(pool, train_index.sort().values), _take(pool, val_index.sort().values)
    mean, std = _channel_stats(pool.images)
    return Splits(
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        mean=mean,
        std=std,
        name=cfg.name,
        synthetic=cfg.name == "synthetic",
        description=f"{title}; {len(train)} train / {len(val)} val / {len(test)} test",
    )


# --------------------------------------------------------------------------------------------------
# Augmentation primitives: pure functions of explicit parameters (the random draws happen in the caller)


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int = CROP_PADDING) -> Tensor:
    """Crop each image of (N, C, H, W) at (top, left) out of its zero-padded copy, then mirror it where
    `flip`; top and left are in 0..2*padding (padding = no shift)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
    # Every crop position as a view, (N, C, 2p + 1, 2p + 1, H, W); one gather picks each image's own.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    cropped = windows[torch.arange(n), :, top, left]  # (N, C, H, W)
    return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


_RANDAUGMENT_CACHE: dict[tuple[int, int, int], tuple[object, list[tuple[str, float | None, bool]]]] = {}


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


def rand_augment(images: Tensor, num_ops: int, magnitude: int, generator: torch.Generator) -> Tensor:
    """torchvision's v2.RandAugment(num_ops, magnitude) applied to each uint8 image of (N, C, H, W)
    independently, drawing from `generator` instead of the global RNG.

    The draws follow torchvision's order image by image (op index, then the sign of a signed op), so with
    a generator seeded like the global RNG the result equals `v2.RandAugment` called on each image in turn
    (tested). The images that drew the same (op, magnitude) in the same slot are then transformed as one
    batch through torchvision's own op code, which is several times faster than a per-image loop.
    Uses v2.RandAugment's `_AUGMENTATION_SPACE` and `_apply_image_or_video_transform` (unchanged since
    torchvision 0.15): the only way to keep its op table and code while drawing from our own generator.
    """
    n, _, height, width = images.shape
    transform, table = _randaugment_ops(magnitude, height, width)
    groups: list[dict[tuple[str, float], list[int]]] = [{} for _ in range(num_ops)]
    for i in range(n):
        for slot in range(num_ops):
            name, value, signed = table[int(torch.randint(len(table), (), generator=generator))]
            op_magnitude = 0.0
            if value is not None:
                op_magnitude = value
                if signed and torch.rand((), generator=generator) <= 0.5:
                    op_magnitude = -value
            groups[slot].setdefault((name, op_magnitude), []).append(i)
    out = images.clone()
    for slot_groups in groups:
        for (name, op_magnitude), members in slot_groups.items():
            if name == "Identity":
                continue
            index = torch.tensor(members)
            out[index] = transform._apply_image_or_video_transform(
                out[index], name, op_magnitude, interpolation=transform.interpolation, fill=transform._fill
            )
    return out


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


def _normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised; mean/std (1, 3, 1, 1) on the images' device."""
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


# --------------------------------------------------------------------------------------------------
# Batching


def steps_per_epoch(splits: Splits, cfg: DataConfig) -> int:
    """Training batches per epoch (the incomplete last batch is dropped, so every batch has one shape)."""
    steps = len(splits.train) // cfg.batch_size
    if steps == 0:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} is larger than the training split ({len(splits.train)} images)"
        )
    return steps


def _stats_on(splits: Splits, device: torch.device | str) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(splits.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(splits.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def _build_train_batches(
    splits: Splits, cfg: DataConfig, seed: int, epoch: int, device: torch.device | str, augment: bool
) -> Iterator[dict[str, Tensor]]:
    train, batch_size = splits.train, cfg.batch_size
    steps = steps_per_epoch(splits, cfg)
    mean, std = _stats_on(splits, device)
    generator = _torch_generator(seed, epoch, _STREAM_ORDER)  # order, crops, flips, mixing permutation
    mix_rng = np.random.default_rng(_derive_seed(seed, epoch, _STREAM_MIX))  # Beta draws, box centres
    use_mixup, use_cutmix = augment and cfg.mixup_alpha > 0, augment and cfg.cutmix_alpha > 0
    order = torch.randperm(len(train), generator=generator)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        images = train.images[index]  # uint8 (B, 3, 32, 32)
        if augment:
            top = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size,), generator=generator)
            left = torch.randint(0, 2 * CROP_PADDING + 1, (batch_size,), generator=generator)
            flip = torch.rand(batch_size, generator=generator) < 0.5
            images = crop_flip(images, top, left, flip)
            if cfg.randaugment_n > 0:
                randaugment_generator = _torch_generator(seed, epoch, step, _STREAM_RANDAUGMENT)
                images = rand_augment(images, cfg.randaugment_n, cfg.randaugment_m, randaugment_generator)
            # Drawn whether or not mixing is on, so toggling mixing leaves later crops and flips unchanged.
            perm = torch.randperm(batch_size, generator=generator)
            choose_cutmix = mix_rng.random() < cfg.cutmix_prob if (use_mixup and use_cutmix) else use_cutmix
            lam_mixup = float(mix_rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)) if use_mixup else 1.0
            lam_cutmix = float(mix_rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha)) if use_cutmix else 1.0
            centre_y, centre_x = (int(c) for c in mix_rng.integers(0, IMAGE_SIZE, size=2))

        x = _normalize(images.to(device, non_blocking=True), mean, std)
        y_a = train.labels[index].to(device, non_blocking=True)
        y_b, lam = y_a, 1.0
        if augment and (use_mixup or use_cutmix):
            perm_device = perm.to(device, non_blocking=True)
            if choose_cutmix:
                x, lam = cutmix(x, perm_device, cutmix_box(lam_cutmix, centre_y, centre_x, IMAGE_SIZE, IMAGE_SIZE))
            else:
                x, lam = mixup(x, perm_device, lam_mixup), lam_mixup
            y_b = y_a[perm_device]
        yield {
            "x": x,
            "y_a": y_a,
            "y_b": y_b,
            "lam": torch.tensor(lam, dtype=torch.float32, device=device),
            "index": index.to(device, non_blocking=True),
        }


def _build_eval_batches(
    data: Dataset, splits: Splits, cfg: DataConfig, device: torch.device | str
) -> Iterator[dict[str, Tensor]]:
    mean, std = _stats_on(splits, device)
    one = torch.tensor(1.0, dtype=torch.float32, device=device)
    for start in range(0, len(data), cfg.eval_batch_size):
        stop = min(start + cfg.eval_batch_size, len(data))
        y = data.labels[start:stop].to(device, non_blocking=True)
        yield {
            "x": _normalize(data.images[start:stop].to(device, non_blocking=True), mean, std),
            "y_a": y,
            "y_b": y,
            "lam": one,
            "index": torch.arange(start, stop, device=device),
        }


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


def train_batches(
    splits: Splits,
    cfg: DataConfig,
    *,
    seed: int,
    epoch: int,
    device: torch.device | str = "cpu",
    augment: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """One epoch of shuffled training batches, `steps_per_epoch` of them, all of shape (batch_size, ...).
    A pure function of (seed, epoch, splits, cfg). `augment=False` keeps the shuffle but applies no crop,
    flip, RandAugment or mixing."""
    steps_per_epoch(splits, cfg)  # a batch size larger than the split fails here, not in the thread
    make = lambda: _build_train_batches(splits, cfg, seed, epoch, device, augment)  # noqa: E731
    return _prefetched(make) if cfg.prefetch else make()


def eval_batches(
    data: Dataset, splits: Splits, cfg: DataConfig, *, device: torch.device | str = "cpu"
) -> Iterator[dict[str, Tensor]]:
    """Every image of `data` once, in order, in batches of eval_batch_size (the last may be smaller);
    no augmentation, lam = 1, y_b = y_a, index = position in `data`."""
    make = lambda: _build_eval_batches(data, splits, cfg, device)  # noqa: E731
    return _prefetched(make) if cfg.prefetch else make()
