"""Image folders in torchvision's ImageFolder layout, at any resolution, decoded and augmented by
DataLoader worker processes.

    DIR/train/<class>/<image>    one folder per class (class index = position in the sorted names)
    DIR/val/<class>/<image>      optional: the validation split
    DIR/test/<class>/<image>     optional: the test split (at least one of val/ and test/ must exist)

This module turns a split into batches of uint8 (B, 3, S, S) images; normalisation, mixup / CutMix and
moving to the device happen batched in the caller (kd.data.loading), as for the in-memory sets.

Determinism: an image's augmentation draws come from the global torch RNG of whichever process decodes it,
seeded from (epoch seed, the image's slot in the epoch's global order) around that one image's transform,
the caller's RNG restored afterwards. A batch is then a pure function of (seed, epoch, config) whatever the
number of workers, which worker decodes which image, or how many data-parallel ranks share the batch; and
the workers can persist across epochs, since what an epoch changes travels with each request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .base import _STREAM_FOLDER_WORKERS, CROP_PADDING, RANDAUGMENT_BINS, DataConfig, FolderDataset, _derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # up to this side CIFAR-style augmentation (resize + pad-4 crop), above it ImageNet's
EVAL_RESIZE_RATIO = 256 / 224  # ImageNet's protocol: resize to 256, centre-crop 224

# A request for one image: (position in the split, epoch seed or -1 for no randomness, slot in the epoch).
ImageKey = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# The layout


@dataclass(frozen=True)
class FolderLayout:
    root: str
    classes: tuple[str, ...]
    train: FolderDataset
    val: FolderDataset | None
    test: FolderDataset | None


def _image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _scan_split(directory: str, class_to_idx: dict[str, int], *, every_class: bool) -> FolderDataset:
    """The images under directory/<class>/ (recursively, sorted), with torchvision's own walk."""
    from torchvision.datasets.folder import make_dataset

    extensions = _image_extensions()
    samples = make_dataset(directory, class_to_idx, extensions=extensions, allow_empty=True)
    if every_class:
        present = {label for _, label in samples}
        empty = [name for name, label in class_to_idx.items() if label not in present]
        if empty:
            shown = ", ".join(empty[:5]) + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else "")
            raise DataError(f"folder data: class folders of {directory} without images: {shown} "
                            f"(image extensions: {' '.join(extensions)})")
    if not samples:
        raise DataError(f"folder data: no images in {directory}/<class>/ (image extensions: {' '.join(extensions)})")
    files = np.array([os.fsencode(os.path.relpath(path, directory)) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return FolderDataset(directory, files, labels)


def scan_folder(root: str) -> FolderLayout:
    """Check and list DIR/train, DIR/val, DIR/test. Every problem is a one-line DataError, raised before the
    (possibly long) walk over the files where it can be."""
    if not root:
        raise ConfigError("--data.root DIR is required with --data.name folder (DIR/train/<class>/<image> plus "
                          "DIR/test/ and/or DIR/val/)")
    directory = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(directory):
        raise DataError(f"folder data: {directory} does not exist" if not os.path.exists(directory)
                        else f"folder data: {directory} is not a directory")
    parts = {name: os.path.join(directory, name) for name in ("train", "val", "test")}
    found = {name: path for name, path in parts.items() if os.path.isdir(path)}
    if "train" not in found:
        raise DataError(f"folder data: {directory} has no train/ folder (expected DIR/train/<class>/<image> "
                        f"plus DIR/test/ and/or DIR/val/)")
    if "val" not in found and "test" not in found:
        raise DataError(f"folder data: {directory} has train/ but neither test/ nor val/ (put the held-out "
                        f"images in DIR/test/<class>/ or DIR/val/<class>/)")
    classes = tuple(sorted(entry.name for entry in os.scandir(found["train"]) if entry.is_dir()))
    if not classes:
        raise DataError(f"folder data: no class folders in {found['train']} (expected train/<class>/<image>)")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    for name in ("val", "test"):
        if name in found:
            unknown = sorted(entry.name for entry in os.scandir(found[name])
                             if entry.is_dir() and entry.name not in class_to_idx)
            if unknown:
                raise DataError(f"folder data: {found[name]} has class folders that train/ lacks: "
                                f"{', '.join(unknown[:5])}")
    splits = {name: _scan_split(path, class_to_idx, every_class=name == "train") for name, path in found.items()}
    if len(classes) < 2:
        raise DataError(f"folder data: {found['train']} has one class folder ({classes[0]}): a classifier needs at "
                        f"least two (train/<class>/<image>, one folder per class)")
    return FolderLayout(directory, classes, splits["train"], splits.get("val"), splits.get("test"))


# --------------------------------------------------------------------------------------------------
# Transforms (torchvision.transforms.v2 on PIL images, ending in uint8 tensors)


def folder_transform(train: bool, image_size: int, randaugment_n: int = 0, randaugment_m: int = 9):
    from torchvision.transforms import v2

    small = image_size <= SMALL_IMAGE_MAX
    if not train:
        resize = image_size if small else int(image_size * EVAL_RESIZE_RATIO)
        ops = [v2.Resize(resize), v2.CenterCrop(image_size)]
    elif small:
        ops = [v2.Resize(image_size), v2.RandomCrop(image_size, padding=CROP_PADDING), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()]
    if train and randaugment_n > 0:
        ops.append(v2.RandAugment(num_ops=randaugment_n, magnitude=randaugment_m, num_magnitude_bins=RANDAUGMENT_BINS))
    return v2.Compose([*ops, v2.PILToTensor()])


class _FolderImages(torch.utils.data.Dataset):
    """Map-style dataset over a split, indexed by ImageKey: returns (uint8 (3, S, S), label, position)."""

    def __init__(self, data: FolderDataset, transform) -> None:
        self.data, self.transform = data, transform
        self.labels = data.labels.numpy()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: ImageKey) -> tuple[Tensor, int, int]:
        from PIL import Image

        position, epoch_seed, slot = key
        path = self.data.path(position)
        try:
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:
            raise DataError(f"folder data: cannot read {path} ({' '.join(str(error).split())})") from None
        if epoch_seed < 0:
            pixels = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_derive_seed(epoch_seed, slot))
                pixels = self.transform(image)
        return pixels, int(self.labels[position]), position


def _collate(samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    images, labels, positions = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64)


class _Plan(torch.utils.data.Sampler):
    """The batch sampler of a loader: the requests of one pass, set before each pass."""

    def __init__(self) -> None:
        self.batches: Iterable[list[ImageKey]] = ()

    def __iter__(self) -> Iterator[list[ImageKey]]:
        return iter(self.batches)


# --------------------------------------------------------------------------------------------------
# Loaders: one per (split, transform), kept while its workers are useful


@dataclass
class _Loader:
    data: FolderDataset
    key: tuple
    loader: torch.utils.data.DataLoader
    plan: _Plan
    busy: bool = False


_LOADERS: list[_Loader] = []  # the persistent ones, oldest first
_MAX_LOADERS = 4  # train (augmented and plain), validation, test
_LOADERS_LOCK = threading.Lock()


def _make_loader(data: FolderDataset, key: tuple, workers: int, pin_memory: bool, persistent: bool) -> _Loader:
    train, image_size, randaugment_n, randaugment_m = key
    plan = _Plan()
    loader = torch.utils.data.DataLoader(
        _FolderImages(data, folder_transform(train, image_size, randaugment_n, randaugment_m)),
        batch_sampler=plan,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=persistent,
        # Seeds the workers' RNGs; without it the DataLoader would draw them from the caller's global RNG.
        generator=torch.Generator().manual_seed(_derive_seed(_STREAM_FOLDER_WORKERS)),
    )
    return _Loader(data, key, loader, plan)


@contextmanager
def _open_loader(data: FolderDataset, key: tuple, workers: int, pin_memory: bool) -> Iterator[_Loader]:
    """A loader for this split and transform: the cached one with persistent workers when it is free, else
    a new one (cached when workers > 0; one used elsewhere at the moment gets a transient sibling)."""
    with _LOADERS_LOCK:
        same = [e for e in _LOADERS if e.data is data and e.key == key and e.loader.num_workers == workers
                and e.loader.pin_memory == pin_memory]
        entry = next((e for e in same if not e.busy), None)
        if entry is None:
            persistent = workers > 0 and not same
            entry = _make_loader(data, key, workers, pin_memory, persistent)
            if persistent:
                idle = [e for e in _LOADERS if not e.busy]
                if len(_LOADERS) >= _MAX_LOADERS and idle:
                    _LOADERS.remove(idle[0])  # its workers stop when the loader is collected
                _LOADERS.append(entry)
        entry.busy = True
    try:
        yield entry
    finally:
        entry.busy = False


def decoded_batches(data: FolderDataset, batches: Iterable[list[ImageKey]], cfg: DataConfig, *, train: bool,
                    pin_memory: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(images uint8 (b, 3, S, S), labels int64 (b,), positions int64 (b,)) for each list of requests, in
    order; `train` picks the augmenting transform (with RandAugment when cfg.randaugment_n > 0)."""
    key = (train, cfg.image_size, cfg.randaugment_n if train else 0, cfg.randaugment_m if train else 0)
    with _open_loader(data, key, cfg.workers, pin_memory) as entry:
        entry.plan.batches = batches
        try:
            yield from entry.loader
        except DataError as error:
            # From a worker the message carries the worker's traceback: keep its last line, the error itself.
            lines = str(error).strip().splitlines()
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
