"""Train / validation / test splits of every dataset, and the size checks that must fail before any work."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import _STREAM_SPLIT, IMAGE_SIZE, DataConfig, Dataset, FolderDataset, Splits, _torch_generator
from .folder import IMAGENET_MEAN, IMAGENET_STD, scan_folder
from .readers import CIFAR, read_cifar, read_fashion_mnist
from .synthetic import make_synthetic


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


def _take(data: Dataset | FolderDataset, index: Tensor) -> Dataset | FolderDataset:
    if isinstance(data, FolderDataset):
        return FolderDataset(data.root, data.files[index.numpy()], data.labels[index])
    return Dataset(data.images[index], data.labels[index])


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Train / validation / test splits of `cfg.name`. Validation is held out of the training set by a
    permutation seeded from `cfg.split_seed` (or `seed` when that is -1); `train_subset` then keeps the
    first N shuffled remaining images. Folder data with a val/ folder uses it instead of a hold-out.
    Sizes that cannot work (validation or subset larger than the data, a batch larger than the training
    split) fail here, in one line, before a run directory exists."""
    val_size, val_folder, mean, std, image_size = cfg.val_size, None, None, None, IMAGE_SIZE
    if cfg.name in CIFAR:
        pool, test = read_cifar(cfg.name, cfg.root)
        num_classes, title = CIFAR[cfg.name]["num_classes"], CIFAR[cfg.name]["title"]
    elif cfg.name == "fashion_mnist":
        pool, test = read_fashion_mnist(cfg.root)
        num_classes, title = 10, "Fashion-MNIST (grey 28x28 replicated to RGB, zero-padded to 32x32)"
    elif cfg.name == "synthetic":
        # The validation images come on top of `synthetic_size`, so the training split has exactly that many.
        # Checked before rendering: the set is meant to be small and a typo would otherwise render for minutes.
        if cfg.val_size > cfg.synthetic_size:
            raise ConfigError(f"data.val_size={cfg.val_size} is larger than the synthetic training set "
                              f"(data.synthetic_size={cfg.synthetic_size}); lower --data.val-size or raise "
                              f"--data.synthetic-size")
        pool = make_synthetic(cfg.synthetic_size + cfg.val_size, cfg.synthetic_classes, part=0)
        test = make_synthetic(max(1, cfg.synthetic_size // 4), cfg.synthetic_classes, part=1)
        num_classes, title = cfg.synthetic_classes, f"synthetic (procedural, {cfg.synthetic_classes} classes)"
    else:
        layout = scan_folder(cfg.root)
        pool, num_classes, image_size = layout.train, len(layout.classes), cfg.image_size
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if layout.val is not None and layout.test is not None:
            val_size, val_folder, test, source = 0, layout.val, layout.test, "val/ and test/"
        elif layout.test is not None:
            test, source = layout.test, "test/, validation held out of train/"
        else:  # ImageNet's layout: its val/ is what results are reported on, so it is the test split here
            test, source = layout.val, "val/ as the test split, validation held out of train/"
        title = f"folder {layout.root} ({num_classes} classes, {image_size}x{image_size}; {source})"

    if val_size >= len(pool):
        raise ConfigError(f"data.val_size={val_size} leaves no training images ({title} has {len(pool)})")
    split_seed = seed if cfg.split_seed < 0 else cfg.split_seed
    order = torch.randperm(len(pool), generator=_torch_generator(split_seed, _STREAM_SPLIT))
    val_index, train_index = order[:val_size], order[val_size:]
    if cfg.train_subset:
        if cfg.train_subset > len(train_index):
            raise ConfigError(
                f"data.train_subset={cfg.train_subset} exceeds the {len(train_index)} training images left "
                f"after holding out {val_size} for validation"
            )
        train_index = train_index[: cfg.train_subset]
    if cfg.batch_size > len(train_index):
        raise ConfigError(f"data.batch_size={cfg.batch_size} is larger than the training split "
                          f"({len(train_index)} images)")
    # Sorted so the splits keep the files' order; which images they hold is all the seed decides.
    train = _take(pool, train_index.sort().values)
    val = val_folder if val_folder is not None else _take(pool, val_index.sort().values)
    if mean is None:
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
        image_size=image_size,
    )
