"""The data config, the split containers and the seeded random streams every data module shares."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

IMAGE_SIZE = 32  # every in-memory set (CIFAR, Fashion-MNIST, synthetic) is 32x32
CROP_PADDING = 4
MAX_IMAGE_SIZE = 1024  # a batch of larger images would not fit in any accelerator's memory
RANDAUGMENT_BINS = 31  # torchvision's default number of magnitude bins; magnitude M indexes into them
DATASET_NAMES = ("cifar100", "cifar10", "fashion_mnist", "synthetic", "folder")

# Independent random streams derived from the run seed.
_STREAM_SPLIT, _STREAM_ORDER, _STREAM_MIX, _STREAM_RANDAUGMENT = 11, 12, 13, 14
_STREAM_FOLDER_AUGMENT, _STREAM_FOLDER_PERM, _STREAM_FOLDER_WORKERS = 15, 16, 17


@dataclass(frozen=True)
class DataConfig:
    name: Literal["cifar100", "cifar10", "fashion_mnist", "synthetic", "folder"] = "cifar100"
    """Dataset. `synthetic` is a small procedural set built into the code (quickstart and tests); `folder` is
    torchvision's ImageFolder layout under --data.root (any resolution, decoded by worker processes)."""
    root: str = ""
    """Where the dataset lives ("" = its default: ./data for CIFAR, downloaded there when absent;
    /usr/share/datasets/fashion-mnist for Fashion-MNIST). For `folder` (required): DIR with train/<class>/*.jpg|png
    and val/ and/or test/ alike (only test/: validation is held out of train/; only val/: val/ is the test split
    and validation is held out of train/)."""
    image_size: int = IMAGE_SIZE
    """Side of the square images the network sees; folder data only (the in-memory sets are 32x32). Above 64:
    RandomResizedCrop + flip for training, resize to size*256/224 + centre crop for evaluation (ImageNet's
    protocol); up to 64: resize + random crop (pad 4) + flip, like CIFAR, and resize + centre crop to evaluate."""
    val_size: int = 5000
    """Images held out of the training set for validation (seeded split; the test set is untouched)."""
    split_seed: int = 0
    """Seed of the validation split. Fixed by default so that teachers and the students of every run seed
    hold out the same images (no teacher has trained on a student's validation set); -1 = the run seed."""
    train_subset: int = 0
    """Train on only the first N images of the shuffled remaining training set (0 = all; budgeted runs)."""
    batch_size: int = 128
    """Training batch size, over all ranks of a data-parallel run (the last incomplete batch of an epoch is
    dropped)."""
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
    """Build the next batches in a background thread while the caller trains (not for folder data with
    workers=0, whose decoding then happens between the caller's steps)."""
    workers: int = 4
    """Worker processes that decode and augment folder images (0 = in the calling process); they persist
    across epochs. The in-memory sets do not use them."""

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ConfigError(f"data.name must be one of {', '.join(DATASET_NAMES)}, got {self.name!r}")
        for field in ("val_size", "train_subset", "randaugment_n", "workers"):
            if getattr(self, field) < 0:
                raise ConfigError(f"data.{field} must be >= 0, got {getattr(self, field)}")
        for field in ("batch_size", "eval_batch_size", "synthetic_size"):
            if getattr(self, field) < 1:
                raise ConfigError(f"data.{field} must be >= 1, got {getattr(self, field)}")
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"--data.image-size must be in 8..{MAX_IMAGE_SIZE}, got {self.image_size}")
        if self.name != "folder" and self.image_size != IMAGE_SIZE:
            raise ConfigError(f"data.image_size applies to folder data; {self.name} images are "
                             f"{IMAGE_SIZE}x{IMAGE_SIZE}")
        if not 0 <= self.randaugment_m < RANDAUGMENT_BINS:
            raise ConfigError(f"data.randaugment_m must be in 0..{RANDAUGMENT_BINS - 1}, got {self.randaugment_m}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError("data.mixup_alpha and data.cutmix_alpha must be >= 0")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise ConfigError(f"data.cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if self.synthetic_classes < 2:
            raise ConfigError(f"data.synthetic_classes must be >= 2, got {self.synthetic_classes}")


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


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so a split can key its DataLoader
class FolderDataset:
    """One split of an image folder: file names and labels; the pixels are decoded batch by batch."""

    root: str  # the split's directory, e.g. DIR/train
    # (N,) bytes, paths relative to `root`. A numpy array rather than a list of str: worker processes forked
    # from the caller share its pages, which a list's reference counts would copy one by one.
    files: np.ndarray
    labels: Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.files.ndim != 1 or self.files.dtype.kind != "S":
            raise ValueError(f"files must be a 1-d bytes array, got {self.files.dtype} {self.files.shape}")
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != self.files.shape:
            raise ValueError(f"labels must be int64 (N,) like files, got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def path(self, position: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[position]))

    @property
    def images(self) -> Tensor:
        raise DataError(
            f"folder data ({self.root}) is decoded batch by batch and has no in-memory images; this needs an "
            "in-memory dataset (cifar100, cifar10, fashion_mnist or synthetic)"
        )


@dataclass(frozen=True)
class Splits:
    train: Dataset | FolderDataset
    val: Dataset | FolderDataset
    test: Dataset | FolderDataset
    num_classes: int
    mean: tuple[float, float, float]  # per channel, in [0, 1] units (the original training set's, or ImageNet's)
    std: tuple[float, float, float]
    name: str
    synthetic: bool
    description: str  # one line for logs and reports, e.g. "synthetic (procedural, 10 classes; ...)"
    image_size: int = IMAGE_SIZE  # side of the (square) images in the batches


# --------------------------------------------------------------------------------------------------
# Seeds


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed that mixes all parts (SeedSequence hashing: nearby seeds give unrelated streams)."""
    state = np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def _torch_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derive_seed(*parts))
