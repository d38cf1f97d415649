"""Datasets, splits, augmentation and batching.

The in-memory sets (CIFAR-10/100, Fashion-MNIST, synthetic) live in memory as uint8 (N, 3, 32, 32) images
and int64 labels; folder data (torchvision's ImageFolder layout, any resolution) is decoded and augmented
by DataLoader worker processes. A training batch is a pure function of (seed, epoch, data, config, rank,
world size): every random draw comes from a generator seeded from them, never from the caller's global
RNG, so a background prefetch thread cannot race with the caller either.

A batch is a dict:
    x      float32 (B, 3, S, S), normalised with the dataset's mean/std (S = 32, or data.image_size for folders)
    y_a    int64 (B,)
    y_b    int64 (B,)   the second target of a mixed batch (= y_a when nothing is mixed)
    lam    float32 0-d  the weight of y_a (1.0 when nothing is mixed)
    index  int64 (B,)   positions of the images in the split they came from (splits.train for training)

Modules: `base` (config, split containers, seeds), `readers` (CIFAR, Fashion-MNIST), `synthetic`,
`folder` (image folders and their workers), `splits` (load_splits), `augment` (crops, RandAugment,
mixup, CutMix), `loading` (batches, data-parallel shards, prefetch).
"""

from .augment import _normalize, _stats_on, crop_flip, cutmix, cutmix_box, mixup, rand_augment
from .base import CROP_PADDING, IMAGE_SIZE, RANDAUGMENT_BINS, DataConfig, Dataset, FolderDataset, Splits
from .folder import IMAGENET_MEAN, IMAGENET_STD
from .loading import eval_batches, steps_per_epoch, train_batches
from .readers import CIFAR_DEFAULT_ROOT, FASHION_MNIST_APT, FASHION_MNIST_DIR
from .splits import load_splits
from .synthetic import make_synthetic

__all__ = [
    "CIFAR_DEFAULT_ROOT",
    "CROP_PADDING",
    "FASHION_MNIST_APT",
    "FASHION_MNIST_DIR",
    "IMAGE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDAUGMENT_BINS",
    "DataConfig",
    "Dataset",
    "FolderDataset",
    "Splits",
    "crop_flip",
    "cutmix",
    "cutmix_box",
    "eval_batches",
    "load_splits",
    "make_synthetic",
    "mixup",
    "rand_augment",
    "steps_per_epoch",
    "train_batches",
]
