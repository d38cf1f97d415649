"""kd/data (in-memory sets): readers (tiny CIFAR files written here, the real Fashion-MNIST), the synthetic
set, splits, input errors (one line, before anything is created), augmentation primitives against
hand-computed results, and the batch stream's determinism, shapes and data-parallel shards.
Folder data has its own file, tests/test_folder_data.py."""

import ast
import gzip
import inspect
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from kd.data import (
    DataConfig,
    Splits,
    crop_flip,
    cutmix,
    cutmix_box,
    eval_batches,
    load_splits,
    make_synthetic,
    mixup,
    rand_augment,
    steps_per_epoch,
    train_batches,
)
from kd.data import readers
from kd.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many small ops; on a shared 2-core machine OpenMP barriers make two threads several
    times slower than one. Results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never touch the network: any connection attempt fails like an offline machine."""

    def offline(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)


def small_synthetic(**overrides) -> tuple[Splits, DataConfig]:
    cfg = DataConfig(name="synthetic", synthetic_size=512, val_size=128, batch_size=32, eval_batch_size=64, prefetch=False)
    cfg = replace(cfg, **overrides)
    return load_splits(cfg, seed=0), cfg


def image_keys(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def denormalize(x: torch.Tensor, splits: Splits) -> torch.Tensor:
    mean = torch.tensor(splits.mean).view(1, 3, 1, 1)
    std = torch.tensor(splits.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def collect(batches) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in batches]


# --------------------------------------------------------------------------------------------------
# Config


def test_every_config_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(DataConfig))
    body = tree.body[0].body
    fields = [(i, node.target.id) for i, node in enumerate(body) if isinstance(node, ast.AnnAssign)]
    assert len(fields) == len(DataConfig.__dataclass_fields__)
    for i, name in fields:
        following = body[i + 1] if i + 1 < len(body) else None
        assert isinstance(following, ast.Expr) and isinstance(following.value.value, str), f"{name} has no docstring"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(val_size=-1),
        dict(batch_size=0),
        dict(randaugment_m=31),
        dict(mixup_alpha=-0.1),
        dict(cutmix_prob=1.5),
        dict(synthetic_classes=1),
        dict(workers=-1),
        dict(image_size=64),  # in-memory sets are 32x32
        dict(name="folder", image_size=4),
    ],
)
def test_config_rejects_bad_values(overrides):
    from kd.errors import ConfigError
    with pytest.raises(ConfigError):
        DataConfig(**overrides)


# --------------------------------------------------------------------------------------------------
# CIFAR


def write_cifar(root: Path, name: str, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tiny dataset in torchvision's pickle layout. Image i of a split starts with the bytes (i // 256,
    i % 256) so it can be traced through the splits."""
    rng = np.random.default_rng(7)

    def images(n: int) -> np.ndarray:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        rows[:, 0], rows[:, 1] = np.arange(n) // 256, np.arange(n) % 256
        return rows

    def dump(path: Path, entry: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(entry, f)

    train_rows, test_rows = images(n_train), images(n_test)
    if name == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        train_labels, test_labels = np.arange(n_train) * 7 % 100, np.arange(n_test) * 3 % 100
        for file, rows, labels in (("train", train_rows, train_labels), ("test", test_rows, test_labels)):
            dump(folder / file, {b"data": rows, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()})
        dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []})
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        train_labels, test_labels = np.arange(n_train) * 7 % 10, np.arange(n_test) * 3 % 10
        per_batch = n_train // 5
        for b in range(5):
            part = slice(b * per_batch, (b + 1) * per_batch)
            dump(folder / f"data_batch_{b + 1}", {b"data": train_rows[part], b"labels": train_labels[part].tolist()})
        dump(folder / "test_batch", {b"data": test_rows, b"labels": test_labels.tolist()})
        dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return train_rows, train_labels, test_rows, test_labels


def original_index(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()


@pytest.mark.parametrize("name, num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_cifar_reader_on_tiny_files(tmp_path, name, num_classes):
    train_rows, train_labels, test_rows, test_labels = write_cifar(tmp_path, name, n_train=300, n_test=40)
    splits = load_splits(DataConfig(name=name, root=str(tmp_path), val_size=50), seed=3)

    assert (len(splits.train), len(splits.val), len(splits.test)) == (250, 50, 40)
    assert splits.num_classes == num_classes and not splits.synthetic
    assert ("CIFAR-100" if name == "cifar100" else "CIFAR-10") in splits.description
    # Row layout: byte c*1024 + y*32 + x of a row is channel c, pixel (y, x).
    expected_images = torch.from_numpy(train_rows).view(-1, 3, 32, 32)
    for part in (splits.train, splits.val):
        index = original_index(part.images)
        assert torch.equal(part.images, expected_images[index])
        assert torch.equal(part.labels, torch.from_numpy(train_labels)[index])
    traced = torch.cat([original_index(splits.train.images), original_index(splits.val.images)])
    assert sorted(traced.tolist()) == list(range(300))
    assert torch.equal(splits.test.images, torch.from_numpy(test_rows).view(-1, 3, 32, 32))  # untouched, in order
    assert torch.equal(splits.test.labels, torch.from_numpy(test_labels))
    pixels = train_rows.reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1) / 255.0
    np.testing.assert_allclose(splits.mean, pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(splits.std, pixels.std(axis=1), rtol=1e-9)


@pytest.fixture
def download_attempts(monkeypatch):
    """The URLs torchvision was asked to download (each attempt fails: the network is off)."""
    from torchvision.datasets import utils as tv_utils

    attempts = []
    real_download = tv_utils.download_url

    def spy(url, *args, **kwargs):
        attempts.append(url)
        return real_download(url, *args, **kwargs)

    monkeypatch.setattr(tv_utils, "download_url", spy)
    return attempts


def test_cifar_missing_offline_says_where_the_files_go(tmp_path, download_attempts):
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(name="cifar100", root=str(tmp_path / "nowhere")), seed=0)
    message = str(raised.value)
    assert download_attempts == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert "\n" not in message
    assert "CIFAR-100 is missing and could not be downloaded" in message
    assert str((tmp_path / "nowhere" / "cifar-100-python").resolve()) + "/" in message
    assert "`train`, `test`, `meta`" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert not (tmp_path / "nowhere").exists()  # created only once a download has succeeded


def test_cifar_root_that_cannot_be_created_fails_before_downloading(tmp_path, download_attempts):
    root = tmp_path / "missing-parent" / "x"
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(name="cifar10", root=str(root)), seed=0)
    message = str(raised.value)
    assert download_attempts == []
    assert "\n" not in message and message.startswith("CIFAR-10 is missing and cannot be downloaded")
    assert f"{root} does not exist and neither does {root.parent}" in message
    assert str(root / "cifar-10-batches-py") + "/" in message
    assert not (tmp_path / "missing-parent").exists()


def test_cifar_root_in_a_read_only_directory_fails_before_downloading(tmp_path, download_attempts, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Simulated, so that the test also means something when it runs as root (who may write anywhere).
    monkeypatch.setattr(readers.os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(name="cifar100", root=str(locked / "data")), seed=0)
    assert f"cannot be downloaded: {locked} is not writable" in str(raised.value)
    assert download_attempts == [] and not (locked / "data").exists()


def test_cli_missing_cifar_root_is_one_line_and_creates_nothing(tmp_path):
    missing = Path("/nonexistent/x")
    assert not missing.parent.exists()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "recipes.ce", "--data.name", "cifar100", "--data.root", str(missing),
         "--compile", "False", "--device", "cpu", "--epochs", "1", "--out-dir", str(tmp_path / "runs")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR-100 is missing"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "/nonexistent/x/cifar-100-python/" in lines[0]
    assert not missing.parent.exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(directory: Path) -> np.ndarray:
    """20 train and 6 test images with no zero pixel; returns the test images."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(1, 256, size=(20, 28, 28), dtype=np.uint8)
    test_images = rng.integers(1, 256, size=(6, 28, 28), dtype=np.uint8)
    write_idx(directory / "train-images-idx3-ubyte.gz", train_images)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    write_idx(directory / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.arange(6) % 10)
    return test_images


def test_fashion_mnist_idx_parser_and_padding(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    test_images = write_fashion_mnist(tmp_path)

    splits = load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=4, batch_size=8), seed=0)
    test = splits.test.images
    assert test.shape == (6, 3, 32, 32)
    for channel in range(3):
        assert torch.equal(test[:, channel, 2:30, 2:30], torch.from_numpy(test_images))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (test[:, :, border] == 0).all()
    assert torch.equal(splits.test.labels, torch.arange(6) % 10)


def test_fashion_mnist_missing_names_the_directory_and_package(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    with pytest.raises(DataError) as raised:
        load_splits(DataConfig(name="fashion_mnist"), seed=0)
    message = str(raised.value)
    assert "\n" not in message
    assert str(tmp_path / "not-installed") in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_fashion_mnist_given_root_never_falls_back_to_the_system_copy(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "system")  # a valid system copy that must not be used
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(tmp_path / "system"))
    assert len(load_splits(DataConfig(name="fashion_mnist", val_size=4, batch_size=8), seed=0).test) == 6
    for root, says in ((tmp_path / "nonexistent", "does not exist"), (tmp_path / "empty", "Fashion-MNIST is missing")):
        if root.name == "empty":
            root.mkdir()
        with pytest.raises(DataError) as raised:
            load_splits(DataConfig(name="fashion_mnist", root=str(root), val_size=4, batch_size=8), seed=0)
        message = str(raised.value)
        assert "\n" not in message and says in message and str(root.resolve()) in message, message
        assert not (tmp_path / "nonexistent").exists()


def test_fashion_mnist_truncated_file_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    write_fashion_mnist(tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DataError, match="is truncated"):
        load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path), val_size=4, batch_size=8), seed=0)


@pytest.mark.requires_fashion_mnist  # skipped with the reason where Debian's package is absent
def test_fashion_mnist_real_files():
    splits = load_splits(DataConfig(name="fashion_mnist", val_size=5000), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.num_classes == 10 and not splits.synthetic
    for part in (splits.train, splits.val, splits.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.labels.min() >= 0 and part.labels.max() <= 9
    pool_images = torch.cat([splits.train.images, splits.val.images])
    pool_labels = torch.cat([splits.train.labels, splits.val.labels])
    assert torch.bincount(pool_labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert splits.test.labels[:3].tolist() == [9, 2, 1]  # the t10k file's first labels, order kept
    # Grey replicated to RGB, zero border, and the well-known training-set pixel mean 0.2860 (28x28).
    assert torch.equal(pool_images[:, 0], pool_images[:, 1]) and torch.equal(pool_images[:, 0], pool_images[:, 2])
    assert pool_images[:, :, :2].max() == 0 and pool_images[:, :, :, 30:].max() == 0
    centre_mean = pool_images[:, 0, 2:30, 2:30].double().mean().item() / 255.0
    assert abs(centre_mean - 0.2860) < 5e-4
    assert abs(splits.mean[0] - 0.2860 * 784 / 1024) < 5e-4  # stats include the zero border


# --------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_shapes_labels_and_determinism():
    splits, cfg = small_synthetic(synthetic_classes=6)
    assert splits.synthetic and "synthetic" in splits.description and splits.num_classes == 6
    assert (len(splits.train), len(splits.val), len(splits.test)) == (512, 128, 128)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (512, 3, 32, 32)
    pool_labels = torch.cat([splits.train.labels, splits.val.labels])
    assert torch.bincount(pool_labels).max() - torch.bincount(pool_labels).min() <= 1
    again = load_splits(cfg, seed=0)
    assert torch.equal(again.train.images, splits.train.images) and torch.equal(again.test.images, splits.test.images)
    # The pixels are a fixed dataset; image i does not depend on how many are generated.
    assert torch.equal(make_synthetic(100, 6, part=0).images, make_synthetic(700, 6, part=0).images[:100])
    assert not torch.equal(make_synthetic(50, 6, part=0).images, make_synthetic(50, 6, part=1).images)


def nearest_class_mean_accuracy(train_features, train_labels, test_features, test_labels, num_classes):
    means = torch.stack([train_features[train_labels == k].mean(0) for k in range(num_classes)])
    predictions = torch.cdist(test_features, means).argmin(1)
    return (predictions == test_labels).float().mean().item()


def test_synthetic_is_learnable_but_not_by_mean_colour():
    splits = load_splits(DataConfig(name="synthetic", synthetic_size=2000, val_size=0), seed=0)
    train, test = splits.train, splits.test
    pixels = nearest_class_mean_accuracy(
        train.images.flatten(1).float(), train.labels, test.images.flatten(1).float(), test.labels, 10
    )
    mean_colour = nearest_class_mean_accuracy(
        train.images.float().mean((2, 3)), train.labels, test.images.float().mean((2, 3)), test.labels, 10
    )
    assert pixels > 0.35  # chance is 0.1; measured ~0.48
    assert mean_colour < 0.6  # pairs of classes share a hue; measured ~0.33


# --------------------------------------------------------------------------------------------------
# Validation split


def test_validation_split_is_disjoint_seeded_and_leaves_test_alone():
    splits, cfg = small_synthetic(val_size=200, synthetic_size=300)
    pool = make_synthetic(500, 10, part=0)
    train_keys, val_keys = image_keys(splits.train.images), image_keys(splits.val.images)
    assert (len(train_keys), len(val_keys)) == (300, 200)
    assert not set(train_keys) & set(val_keys)
    assert sorted(train_keys + val_keys) == sorted(image_keys(pool.images))
    assert torch.equal(splits.test.images, make_synthetic(75, 10, part=1).images)

    same = load_splits(cfg, seed=0)
    assert torch.equal(same.val.images, splits.val.images)
    # The split follows split_seed (fixed by default, so every run seed shares it), or the run seed at -1.
    assert torch.equal(load_splits(cfg, seed=1).val.images, splits.val.images)
    assert set(image_keys(load_splits(replace(cfg, split_seed=1), seed=0).val.images)) != set(val_keys)
    assert set(image_keys(load_splits(replace(cfg, split_seed=-1), seed=1).val.images)) != set(val_keys)
    assert torch.equal(load_splits(replace(cfg, split_seed=-1), seed=0).val.images, splits.val.images)

    subset = load_splits(replace(cfg, train_subset=64), seed=0)
    assert len(subset.train) == 64 and torch.equal(subset.val.images, splits.val.images)
    assert set(image_keys(subset.train.images)) <= set(train_keys)

    with pytest.raises(ConfigError, match="train_subset"):
        load_splits(replace(cfg, train_subset=301), seed=0)


@pytest.mark.parametrize("overrides, says", [
    (dict(val_size=100), "data.val_size=100 leaves no training images (CIFAR-10 has 100)"),
    (dict(val_size=100000), "data.val_size=100000 leaves no training images"),
    (dict(val_size=10, train_subset=100000), "data.train_subset=100000 exceeds the 90 training images left after "
                                             "holding out 10 for validation"),
    (dict(val_size=10, batch_size=1000), "data.batch_size=1000 is larger than the training split (90 images)"),
    (dict(val_size=10, train_subset=20, batch_size=32), "data.batch_size=32 is larger than the training split (20"),
])
def test_impossible_sizes_are_one_line_before_any_work(tmp_path, overrides, says):
    write_cifar(tmp_path, "cifar10", n_train=100, n_test=10)
    with pytest.raises(ConfigError) as raised:
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), **overrides), seed=0)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_synthetic_validation_larger_than_the_set_is_refused_before_rendering(monkeypatch):
    from kd.data import splits as splits_module

    def render(*args, **kwargs):
        raise AssertionError("rendered before the sizes were checked")

    monkeypatch.setattr(splits_module, "make_synthetic", render)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as raised:
        load_splits(DataConfig(name="synthetic", val_size=100000), seed=0)
    assert time.perf_counter() - started < 1.0
    message = str(raised.value)
    assert message == ("data.val_size=100000 is larger than the synthetic training set (data.synthetic_size=2000); "
                       "lower --data.val-size or raise --data.synthetic-size")


# --------------------------------------------------------------------------------------------------
# Augmentation primitives


def test_crop_flip_matches_slicing_a_zero_padded_image():
    image = (torch.arange(3 * 32 * 32) % 251 + 1).to(torch.uint8).view(1, 3, 32, 32)  # no zero pixel
    params = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)]
    top, left, flip = (torch.tensor(column) for column in zip(*params))
    out = crop_flip(image.expand(len(params), -1, -1, -1), top, left, flip)

    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image[0]
    for i, (t, l, f) in enumerate(params):
        expected = padded[:, t : t + 32, l : l + 32]
        assert torch.equal(out[i], expected.flip(-1) if f else expected), (t, l, f)
    # Hand-checked corners: no shift is the identity, (0, 0) shifts the image down-right by 4.
    assert torch.equal(out[params.index((4, 4, False))], image[0])
    assert torch.equal(out[params.index((4, 4, True))], image[0].flip(-1))
    shifted = out[params.index((0, 0, False))]
    assert (shifted[:, :4] == 0).all() and (shifted[:, :, :4] == 0).all()
    assert torch.equal(shifted[:, 4:, 4:], image[0, :, :28, :28])


def test_training_images_are_crops_and_flips_of_the_indexed_images():
    splits, cfg = small_synthetic(batch_size=16)
    batch = next(iter(train_batches(splits, cfg, seed=5, epoch=0)))
    seen = denormalize(batch["x"], splits)
    sources = splits.train.images[batch["index"]]
    params = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)]
    top, left, flip = (torch.tensor(column) for column in zip(*params))
    shifts = set()
    for image, source in zip(seen, sources):
        candidates = crop_flip(source.expand(len(params), -1, -1, -1), top, left, flip)
        matches = [p for p, candidate in zip(params, candidates) if torch.equal(candidate, image)]
        assert matches, "a training image is not a crop/flip of the image its index names"
        shifts.add(matches[0])
    assert len(shifts) > 4  # the crops and flips are random, not all the same


def test_rand_augment_equals_torchvision_per_image():
    images = make_synthetic(48, 10, part=0).images
    for num_ops, magnitude in ((2, 9), (3, 27)):
        ours = rand_augment(images, num_ops, magnitude, torch.Generator().manual_seed(123))
        torch.manual_seed(123)
        reference = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        expected = torch.stack([reference(image) for image in images])
        assert torch.equal(ours, expected)
        assert (ours != images).flatten(1).any(1).float().mean() > 0.5  # it does augment


def test_mixup_arithmetic():
    x = torch.randn(6, 3, 32, 32)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    mixed = mixup(x, perm, 0.3)
    for i in range(6):
        torch.testing.assert_close(mixed[i], 0.3 * x[i] + 0.7 * x[perm[i]])


@pytest.mark.parametrize(
    "lam0, centre, box, kept",
    [
        (0.5, (16, 16), (5, 28, 5, 28), 1 - 23 * 23 / 1024),  # round(32 * sqrt(0.5)) = 23, centred
        (0.5, (0, 0), (0, 12, 0, 12), 1 - 12 * 12 / 1024),  # clipped at the top-left corner
        (0.75, (31, 3), (23, 32, 0, 11), 1 - 9 * 11 / 1024),  # 16 x 16 box from (23, -5): clipped on two sides
        (1.0, (10, 10), (10, 10, 10, 10), 1.0),  # empty box
    ],
)
def test_cutmix_pastes_the_permuted_box_and_lam_is_the_kept_area(lam0, centre, box, kept):
    assert cutmix_box(lam0, *centre, 32, 32) == box
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 32, 32) + 1.0  # image i is all i + 1
    perm = torch.tensor([2, 4, 1, 0, 3])
    mixed, lam = cutmix(x, perm, box)
    assert lam == kept
    y1, y2, x1, x2 = box
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    for i in range(5):
        assert (mixed[i][:, inside] == perm[i] + 1).all()
        assert (mixed[i][:, ~inside] == i + 1).all()
        assert (mixed[i] == i + 1).float().mean().item() == pytest.approx(kept, abs=1e-12)


def test_cutmix_box_area_tracks_one_minus_lam0_when_not_clipped():
    for lam0 in np.linspace(0.05, 0.95, 19):
        y1, y2, x1, x2 = cutmix_box(float(lam0), 16, 16, 32, 32)
        assert abs((y2 - y1) * (x2 - x1) / 1024 - (1 - lam0)) < 0.04


# --------------------------------------------------------------------------------------------------
# The batch stream


def partner_labels(mixed: dict, plain: dict, i: int, combine) -> set[int]:
    """Labels of the images j of the plain batch for which mixed image i == combine(plain i, plain j)."""
    x = plain["x"]
    matches = [j for j in range(x.shape[0]) if torch.allclose(mixed["x"][i], combine(x[i], x[j]), atol=1e-5)]
    assert matches, f"image {i} is not a mix of its own crop and another image of the batch"
    return {int(plain["y_a"][j]) for j in matches}


def paste(image: torch.Tensor, other: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    y1, y2, x1, x2 = box
    out = image.clone()
    out[:, y1:y2, x1:x2] = other[:, y1:y2, x1:x2]
    return out


def test_mixup_in_the_stream_mixes_the_batch_own_crops():
    splits, cfg = small_synthetic(mixup_alpha=1.0)
    plain = next(iter(train_batches(splits, replace(cfg, mixup_alpha=0.0), seed=2, epoch=1)))
    mixed = next(iter(train_batches(splits, cfg, seed=2, epoch=1)))
    lam = float(mixed["lam"])
    assert mixed["lam"].shape == () and mixed["lam"].dtype == torch.float32 and 0.0 < lam < 1.0
    assert torch.equal(mixed["index"], plain["index"]) and torch.equal(mixed["y_a"], plain["y_a"])
    for i in range(cfg.batch_size):
        assert int(mixed["y_b"][i]) in partner_labels(mixed, plain, i, lambda a, b: lam * a + (1 - lam) * b)


def test_cutmix_in_the_stream_lam_is_the_exact_kept_area():
    splits, cfg = small_synthetic(cutmix_alpha=1.0)
    plain_batches = collect(train_batches(splits, replace(cfg, cutmix_alpha=0.0), seed=4, epoch=0))
    lams = []
    for plain, mixed in zip(plain_batches, train_batches(splits, cfg, seed=4, epoch=0)):
        changed = (mixed["x"] != plain["x"]).any(dim=(0, 1))  # (H, W): where any image took a pasted pixel
        lam = float(mixed["lam"])
        lams.append(lam)
        if changed.any():
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            y1, y2, x1, x2 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
            assert changed[y1:y2, x1:x2].all() and changed.sum() == (y2 - y1) * (x2 - x1)  # one rectangle
            assert lam == 1 - (y2 - y1) * (x2 - x1) / 1024
            for i in range(cfg.batch_size):
                labels = partner_labels(mixed, plain, i, lambda a, b: paste(a, b, (y1, y2, x1, x2)))
                assert int(mixed["y_b"][i]) in labels
        else:
            assert lam == 1.0
    assert len(set(lams)) > 3 and all(0.0 <= lam <= 1.0 for lam in lams)


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_batches_are_a_pure_function_of_seed_and_epoch():
    splits, cfg = small_synthetic(synthetic_size=256, randaugment_n=2, randaugment_m=9, mixup_alpha=0.4, cutmix_alpha=1.0)
    global_state = torch.get_rng_state()
    first = collect(train_batches(splits, cfg, seed=1, epoch=3))
    assert torch.equal(torch.get_rng_state(), global_state)  # the caller's RNG is untouched
    torch.manual_seed(999)  # and the batches do not depend on it
    second = collect(train_batches(splits, cfg, seed=1, epoch=3))
    assert_same_batches(first, second)

    next_epoch = collect(islice(train_batches(splits, cfg, seed=1, epoch=4), 1))
    other_seed = collect(islice(train_batches(splits, cfg, seed=2, epoch=3), 1))
    for other in (next_epoch, other_seed):
        assert not torch.equal(first[0]["index"], other[0]["index"])
        assert not torch.equal(first[0]["x"], other[0]["x"])
    # Both mixing kinds occur when both are on.
    kinds = {float(b["lam"]) * 1024 == round(float(b["lam"]) * 1024) for b in first}
    assert kinds == {True, False}


def test_prefetch_gives_the_same_batches_and_stops_its_thread():
    splits, cfg = small_synthetic(synthetic_size=256, randaugment_n=1, mixup_alpha=0.4, cutmix_alpha=1.0)
    direct = collect(train_batches(splits, cfg, seed=0, epoch=0))
    prefetched = collect(train_batches(splits, replace(cfg, prefetch=True), seed=0, epoch=0))
    assert_same_batches(direct, prefetched)
    assert_same_batches(
        collect(eval_batches(splits.val, splits, cfg)), collect(eval_batches(splits.val, splits, replace(cfg, prefetch=True)))
    )

    stream = train_batches(splits, replace(cfg, prefetch=True), seed=0, epoch=0)
    next(stream)
    assert any(t.name == "kd-data-prefetch" for t in threading.enumerate())
    stream.close()  # what a `break` out of the loop does once the generator is dropped
    assert not any(t.name == "kd-data-prefetch" for t in threading.enumerate())


def test_prefetch_raises_producer_errors_in_the_caller():
    splits, cfg = small_synthetic(prefetch=True)
    with pytest.raises(RuntimeError):
        next(iter(train_batches(splits, cfg, seed=0, epoch=0, device="no-such-device")))


def test_eval_covers_every_image_once_in_order():
    splits, cfg = small_synthetic(eval_batch_size=50)
    batches = collect(eval_batches(splits.val, splits, cfg))
    assert [b["x"].shape[0] for b in batches] == [50, 50, 28]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(len(splits.val)))
    assert torch.equal(torch.cat([denormalize(b["x"], splits) for b in batches]), splits.val.images)
    assert torch.equal(torch.cat([b["y_a"] for b in batches]), splits.val.labels)
    for b in batches:
        assert b["x"].dtype == torch.float32 and torch.equal(b["y_b"], b["y_a"]) and float(b["lam"]) == 1.0
    # Normalised with the dataset statistics: the training split is close to zero mean, unit std.
    x = torch.cat([b["x"] for b in eval_batches(splits.train, splits, cfg)])
    assert x.mean((0, 2, 3)).abs().max() < 0.05 and (x.std((0, 2, 3)) - 1).abs().max() < 0.05


def test_training_drops_the_last_batch_and_keeps_one_shape():
    splits, cfg = small_synthetic(batch_size=100, cutmix_alpha=1.0)  # 512 images: 5 batches, 12 dropped
    assert steps_per_epoch(splits, cfg) == 5
    batches = collect(train_batches(splits, cfg, seed=0, epoch=0))
    assert len(batches) == 5
    for b in batches:
        assert b["x"].shape == (100, 3, 32, 32) and b["x"].dtype == torch.float32
        assert b["y_a"].shape == b["y_b"].shape == b["index"].shape == (100,)
        assert b["y_a"].dtype == b["y_b"].dtype == b["index"].dtype == torch.int64
        assert b["lam"].shape == () and b["lam"].dtype == torch.float32
        assert torch.equal(b["y_a"], splits.train.labels[b["index"]])
        assert sorted(b["y_b"].tolist()) == sorted(b["y_a"].tolist())  # a permutation of the batch
    index = torch.cat([b["index"] for b in batches])
    assert index.unique().numel() == 500 and index.max() < len(splits.train)

    plain = collect(train_batches(splits, cfg, seed=0, epoch=0, augment=False))
    assert all(float(b["lam"]) == 1.0 and torch.equal(b["y_b"], b["y_a"]) for b in plain)
    assert torch.equal(denormalize(plain[0]["x"], splits), splits.train.images[plain[0]["index"]])

    with pytest.raises(ConfigError, match="batch_size"):
        steps_per_epoch(splits, replace(cfg, batch_size=513))


# --------------------------------------------------------------------------------------------------
# Data-parallel shards


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_concatenate_to_the_global_batch(world_size):
    # Crops, flips, RandAugment, mixup and CutMix all on: a rank's images are mixed with partners that may
    # live on another rank, and must come out exactly as in the single-process batch.
    splits, cfg = small_synthetic(synthetic_size=128, batch_size=32, randaugment_n=2, randaugment_m=13,
                                  mixup_alpha=0.4, cutmix_alpha=1.0)
    whole = collect(train_batches(splits, cfg, seed=7, epoch=1))
    shards = [collect(train_batches(splits, cfg, seed=7, epoch=1, rank=rank, world_size=world_size))
              for rank in range(world_size)]
    assert {len(shard) for shard in shards} == {len(whole)} == {4}
    lams = set()
    for step, batch in enumerate(whole):
        for rank, shard in enumerate(shards):
            part = shard[step]
            assert part["x"].shape == (32 // world_size, 3, 32, 32) and part["index"].shape == (32 // world_size,)
            assert torch.equal(part["lam"], batch["lam"])
        for key in ("x", "y_a", "y_b", "index"):
            assert torch.equal(torch.cat([shard[step][key] for shard in shards]), batch[key]), (step, key)
        lams.add(float(batch["lam"]))
    assert len(lams) == len(whole) and 1.0 not in lams  # every batch was mixed
    # Without augmentation too, and the shards of one step are disjoint.
    plain = [collect(train_batches(splits, cfg, seed=7, epoch=1, augment=False, rank=rank, world_size=world_size))
             for rank in range(world_size)]
    first = [set(shard[0]["index"].tolist()) for shard in plain]
    assert sum(len(part) for part in first) == len(set().union(*first)) == 32


def test_eval_shards_cover_every_image_exactly_once():
    splits, cfg = small_synthetic(eval_batch_size=50)  # 128 validation images: batches of 50, 50, 28
    whole = collect(eval_batches(splits.val, splits, cfg))
    shards = [collect(eval_batches(splits.val, splits, cfg, rank=rank, world_size=3)) for rank in range(3)]
    counts = [sum(b["x"].shape[0] for b in shard) for shard in shards]
    assert sum(counts) == len(splits.val) and max(counts) - min(counts) <= 3  # unequal counts, no padding
    seen = torch.cat([b["index"] for shard in shards for b in shard])
    assert sorted(seen.tolist()) == list(range(len(splits.val)))
    by_index = {int(i): (x, y) for b in whole for i, x, y in zip(b["index"], b["x"], b["y_a"])}
    for shard in shards:
        for b in shard:
            for i, x, y in zip(b["index"], b["x"], b["y_a"]):
                assert torch.equal(x, by_index[int(i)][0]) and int(y) == int(by_index[int(i)][1])
    # One image per rank at most in a batch smaller than the world: the empty shards are skipped.
    tiny = collect(eval_batches(splits.val, splits, replace(cfg, eval_batch_size=2), rank=2, world_size=3))
    assert tiny == []


def test_shard_arguments_are_checked():
    splits, cfg = small_synthetic(batch_size=32)
    with pytest.raises(ConfigError, match="batch_size=32 is not divisible by the world size 3"):
        train_batches(splits, cfg, seed=0, epoch=0, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="rank"):
        train_batches(splits, cfg, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        eval_batches(splits.val, splits, cfg, rank=-1, world_size=2)
