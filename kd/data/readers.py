"""Readers of the datasets that ship as files: CIFAR-10/100 (torchvision's python-pickle format, downloaded
when absent) and Fashion-MNIST (the original IDX files, as Debian's dataset-fashion-mnist installs them).

Every failure the user can fix (missing files, a root that cannot hold a download, a truncated file) is a
one-line :class:`kd.errors.DataError` that says where the files must go, raised before anything is created
on disk.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from .base import IMAGE_SIZE, Dataset

CIFAR_DEFAULT_ROOT = "data"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_APT = "dataset-fashion-mnist"

# --------------------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle format)

CIFAR = {
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


def read_cifar(name: str, root: str) -> tuple[Dataset, Dataset]:
    """(train, test) of CIFAR-10 or CIFAR-100 from `root` (default ./data), downloaded there when absent."""
    spec = CIFAR[name]
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
    """Download and extract the archive into `root_dir`. The root must exist or be creatable in an existing,
    writable parent (checked first); the archive goes to a temporary directory, and `root_dir` is created
    only once the download has succeeded, so a failure leaves the disk as it was."""
    import torchvision.datasets as tv_datasets
    from torchvision.datasets import utils as tv_utils

    spec = CIFAR[name]
    tv_class = getattr(tv_datasets, spec["tv_class"])
    folder = root_dir / spec["folder"]
    files = [*spec["train"], spec["test"], spec["meta"]]
    where = (f"put {', '.join(f'`{f}`' for f in files)} in {folder}/ (extract {tv_class.url} into {root_dir}/) "
             f"or pass --data.root DIR where DIR/{spec['folder']}/ has them")
    missing = f"{spec['title']} is missing"
    if root_dir.exists() and not root_dir.is_dir():
        raise DataError(f"{missing}: {root_dir} is not a directory; {where}")
    if not root_dir.exists() and not root_dir.parent.is_dir():
        raise DataError(f"{missing} and cannot be downloaded: {root_dir} does not exist and neither does "
                        f"{root_dir.parent}; {where}")
    target = root_dir if root_dir.exists() else root_dir.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise DataError(f"{missing} and cannot be downloaded: {target} is not writable; {where}")
    with tempfile.TemporaryDirectory(prefix="kd-download-") as scratch:
        try:
            tv_utils.download_url(tv_class.url, scratch, filename=tv_class.filename, md5=tv_class.tgz_md5)
        except Exception as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            raise DataError(f"{missing} and could not be downloaded ({reason}); {where}") from error
        root_dir.mkdir(exist_ok=True)
        tv_utils.extract_archive(os.path.join(scratch, tv_class.filename), str(root_dir))
    absent = [f for f in files if not (folder / f).is_file()]
    if absent:
        raise DataError(f"{missing}: the downloaded archive did not contain {absent}; {where}")


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
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes (header {raw[:4].hex()})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def _fashion_to_rgb32(images: np.ndarray) -> Tensor:
    grey = torch.from_numpy(images.copy())  # (N, 28, 28)
    pad = (IMAGE_SIZE - grey.shape[-1]) // 2
    padded = F.pad(grey, (pad, pad, pad, pad))  # (N, 32, 32), zero border
    return padded[:, None].expand(-1, 3, -1, -1).contiguous()


def read_fashion_mnist(root: str) -> tuple[Dataset, Dataset]:
    """(train, test) from `root` (or root/fashion-mnist) when given, else from Debian's directory. A root
    that was given never falls back to the system copy: a run reads the data it was told to."""
    files = ", ".join(f"{stem}.gz" for stem in _FASHION_FILES.values())
    if root:
        directory = Path(root).expanduser().resolve()
        if not directory.is_dir():
            problem = "is a file, not a folder" if directory.exists() else "does not exist"
            raise DataError(f"Fashion-MNIST: --data.root {directory} {problem} (put {files} in a folder and pass "
                            f"it, or leave --data.root empty to read {FASHION_MNIST_DIR})")
        candidates = [directory, directory / "fashion-mnist"]
        advice = f"put {files} in {directory} (or leave --data.root empty to read {FASHION_MNIST_DIR})"
    else:
        candidates = [Path(FASHION_MNIST_DIR)]
        advice = (f"put {files} in {FASHION_MNIST_DIR} (`apt-get install -y {FASHION_MNIST_APT}` does that) "
                  f"or in --data.root DIR")
    for directory in candidates:
        paths = {key: _find_idx(directory, stem) for key, stem in _FASHION_FILES.items()}
        if all(paths.values()):
            break
    else:
        looked = ", ".join(str(d) for d in candidates)
        raise DataError(f"Fashion-MNIST is missing: {advice} (looked in: {looked})")
    splits = []
    for part in ("train", "test"):
        images = _read_idx(paths[f"{part}_images"], ndim=3)
        labels = _read_idx(paths[f"{part}_labels"], ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"Fashion-MNIST {part}: {images.shape[0]} images but {labels.shape[0]} labels")
        splits.append(Dataset(_fashion_to_rgb32(images), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]
