"""kd/data with --data.name folder: torchvision's ImageFolder layout, written here as a tiny set of images
(3 classes, 40x48 RGB, the class visible in the dominant colour channel), through the public API
(load_splits, train_batches, eval_batches) and once through the real CLI."""

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from kd.data import IMAGENET_MEAN, IMAGENET_STD, DataConfig, FolderDataset, load_splits, steps_per_epoch
from kd.data import eval_batches, train_batches
from kd.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")  # class k is brightest in colour channel k
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_images(directory: Path, per_class: int, suffix: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
            pixels[..., k] += 180
            Image.fromarray(pixels).save(directory / name / f"{name}_{i}{suffix}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """DIR/train (PNG, 3 x 8) and DIR/test (JPEG, 3 x 4)."""
    root = tmp_path_factory.mktemp("folder")
    write_images(root / "train", TRAIN_PER_CLASS, ".png", seed=0)
    write_images(root / "test", TEST_PER_CLASS, ".jpg", seed=1)
    return root


def config(folder: Path, **overrides) -> DataConfig:
    base = DataConfig(name="folder", root=str(folder), val_size=6, batch_size=6, eval_batch_size=5, workers=0,
                      prefetch=False)
    return replace(base, **overrides)


def collect(batches) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in batches]


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255.0


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def class_of(split: FolderDataset, position: int) -> str:
    return Path(split.path(position)).parent.name


# --------------------------------------------------------------------------------------------------
# Layout and splits


def test_labels_follow_the_class_folders_and_validation_is_held_out(folder):
    cfg = config(folder)
    splits = load_splits(cfg, seed=0)
    assert splits.name == "folder" and not splits.synthetic and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 12)
    assert (splits.mean, splits.std, splits.image_size) == (IMAGENET_MEAN, IMAGENET_STD, 32)
    assert "folder" in splits.description and "3 classes" in splits.description and "\n" not in splits.description
    for split in (splits.train, splits.val, splits.test):
        for position in range(len(split)):
            assert CLASSES[int(split.labels[position])] == class_of(split, position)
    # Validation is held out of train/: disjoint, together all of train/, seeded by split_seed.
    train_files, val_files = set(splits.train.files.tolist()), set(splits.val.files.tolist())
    assert not train_files & val_files
    assert {f.decode() for f in train_files | val_files} == {
        f"{name}/{name}_{i}.png" for name in CLASSES for i in range(TRAIN_PER_CLASS)}
    assert splits.test.files.tolist() == [f"{name}/{name}_{i}.jpg".encode()
                                          for name in CLASSES for i in range(TEST_PER_CLASS)]  # in order, untouched
    assert load_splits(cfg, seed=5).val.files.tolist() == splits.val.files.tolist()  # fixed split_seed
    assert set(load_splits(replace(cfg, split_seed=1), seed=0).val.files.tolist()) != val_files
    subset = load_splits(replace(cfg, train_subset=9), seed=0)
    assert len(subset.train) == 9 and set(subset.train.files.tolist()) <= train_files
    # Folder images are never in memory: code that needs pixels says so in one line.
    with pytest.raises(DataError, match="in-memory dataset"):
        splits.train.images


def test_a_val_folder_is_the_validation_split_and_alone_it_is_the_test_split(folder, tmp_path):
    three = tmp_path / "three"
    shutil.copytree(folder / "train", three / "train")
    shutil.copytree(folder / "test", three / "test")
    write_images(three / "val", 2, ".png", seed=2)
    splits = load_splits(config(three, val_size=999), seed=0)  # val_size is not used: val/ is the validation
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 12)
    assert splits.val.root == str(three / "val") and splits.test.root == str(three / "test")

    imagenet_like = tmp_path / "imagenet_like"  # train/ and val/: val/ is what results are reported on
    shutil.copytree(folder / "train", imagenet_like / "train")
    shutil.copytree(folder / "test", imagenet_like / "val")
    splits = load_splits(config(imagenet_like), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 12)
    assert splits.test.root == str(imagenet_like / "val") and splits.val.root == str(imagenet_like / "train")
    assert "val/ as the test split" in splits.description


# --------------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("image_size", [32, 64, 96])  # 96: RandomResizedCrop and resize-256/224 + centre crop
def test_batch_shapes_and_format(folder, image_size):
    cfg = config(folder, image_size=image_size, mixup_alpha=0.4)
    splits = load_splits(cfg, seed=0)
    assert splits.image_size == image_size and steps_per_epoch(splits, cfg) == 3
    batches = collect(train_batches(splits, cfg, seed=0, epoch=0))
    assert len(batches) == 3
    for b in batches:
        assert b["x"].shape == (6, 3, image_size, image_size) and b["x"].dtype == torch.float32
        assert b["y_a"].shape == b["y_b"].shape == b["index"].shape == (6,)
        assert b["y_a"].dtype == b["y_b"].dtype == b["index"].dtype == torch.int64
        assert b["lam"].shape == () and b["lam"].dtype == torch.float32 and 0.0 < float(b["lam"]) < 1.0
        assert torch.equal(b["y_a"], splits.train.labels[b["index"]])
        assert sorted(b["y_b"].tolist()) == sorted(b["y_a"].tolist())  # mixed within the batch
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(18))
    evaluated = collect(eval_batches(splits.test, splits, cfg))
    assert [b["x"].shape for b in evaluated] == [(5, 3, image_size, image_size)] * 2 + [(2, 3, image_size, image_size)]


def test_pixels_carry_the_label_of_their_folder(folder):
    cfg = config(folder, image_size=40)
    splits = load_splits(cfg, seed=0)
    for batches in (train_batches(splits, cfg, seed=1, epoch=0), eval_batches(splits.test, splits, cfg)):
        for b in batches:
            brightest = denormalize(b["x"]).mean((2, 3)).argmax(1)
            assert torch.equal(brightest, b["y_a"])


def test_eval_is_torchvision_resize_and_centre_crop_and_covers_every_image_once(folder):
    cfg = config(folder, image_size=96)
    splits = load_splits(cfg, seed=0)
    batches = collect(eval_batches(splits.test, splits, cfg))
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(12))
    assert torch.equal(torch.cat([b["y_a"] for b in batches]), splits.test.labels)
    reference = v2.Compose([v2.Resize(int(96 * 256 / 224)), v2.CenterCrop(96), v2.PILToTensor()])
    x = torch.cat([b["x"] for b in batches])
    for position in (0, 7, 11):
        expected = reference(Image.open(splits.test.path(position)).convert("RGB")).float()
        torch.testing.assert_close(denormalize(x[position : position + 1])[0], expected, atol=1e-3, rtol=0)
    # Shared by 2 ranks: unequal counts are fine, every image exactly once.
    shards = [collect(eval_batches(splits.test, splits, cfg, rank=rank, world_size=2)) for rank in range(2)]
    seen = torch.cat([b["index"] for shard in shards for b in shard])
    assert sorted(seen.tolist()) == list(range(12))
    for shard in shards:
        for b in shard:
            torch.testing.assert_close(b["x"], x[b["index"]], atol=0, rtol=0)


def test_batches_are_a_pure_function_of_seed_and_epoch_whatever_the_workers(folder):
    cfg = config(folder, workers=2, randaugment_n=2, mixup_alpha=0.4, cutmix_alpha=1.0)
    splits = load_splits(cfg, seed=0)
    global_state = torch.get_rng_state()
    first = collect(train_batches(splits, cfg, seed=3, epoch=1))
    assert torch.equal(torch.get_rng_state(), global_state)  # the caller's RNG is untouched
    torch.manual_seed(999)
    assert_same_batches(first, collect(train_batches(splits, cfg, seed=3, epoch=1)))  # reused persistent workers
    assert_same_batches(first, collect(train_batches(splits, replace(cfg, prefetch=True), seed=3, epoch=1)))
    # Which process decodes an image does not matter: in-process decoding gives the same batches.
    assert_same_batches(first, collect(train_batches(splits, replace(cfg, workers=0), seed=3, epoch=1)))
    for seed, epoch in ((3, 2), (4, 1)):
        other = collect(train_batches(splits, cfg, seed=seed, epoch=epoch))
        assert not torch.equal(first[0]["index"], other[0]["index"])
        assert not torch.equal(first[0]["x"], other[0]["x"])
    # augment=False: the same order, the evaluation transform, nothing mixed.
    plain = collect(train_batches(splits, cfg, seed=3, epoch=1, augment=False))
    assert all(float(b["lam"]) == 1.0 and torch.equal(b["y_b"], b["y_a"]) for b in plain)
    assert torch.equal(torch.cat([b["index"] for b in plain]), torch.cat([b["index"] for b in first]))
    assert not torch.equal(torch.cat([b["x"] for b in plain]), torch.cat([b["x"] for b in first]))


def test_in_process_decoding_stays_in_the_callers_thread(folder):
    # With workers=0 the augmentation seeds the global RNG around each image (restoring it afterwards); in a
    # background thread that would race with the caller's own draws, so there is no prefetch thread then.
    cfg = config(folder, workers=0, prefetch=True)
    splits = load_splits(cfg, seed=0)
    stream = train_batches(splits, cfg, seed=0, epoch=0)
    next(stream)
    assert not any(t.name == "kd-data-prefetch" for t in threading.enumerate())
    stream.close()
    stream = train_batches(splits, replace(cfg, workers=1), seed=0, epoch=0)
    next(stream)
    assert any(t.name == "kd-data-prefetch" for t in threading.enumerate())
    stream.close()
    assert not any(t.name == "kd-data-prefetch" for t in threading.enumerate())


def test_rank_shards_of_folder_batches(folder):
    cfg = config(folder, workers=2)
    splits = load_splits(cfg, seed=0)
    whole = collect(train_batches(splits, cfg, seed=2, epoch=0))
    shards = [collect(train_batches(splits, cfg, seed=2, epoch=0, rank=rank, world_size=2)) for rank in range(2)]
    for step, batch in enumerate(whole):
        # Each image's augmentation follows its slot in the global batch, so without mixing the shards
        # concatenate to exactly the single-process batch.
        for key in ("x", "y_a", "index"):
            assert torch.equal(torch.cat([shard[step][key] for shard in shards]), batch[key]), key
        assert all(shard[step]["x"].shape == (3, 3, 32, 32) for shard in shards)
    # Mixed: one lam for all ranks; partners stay within a rank's shard.
    mixed = replace(cfg, cutmix_alpha=1.0)
    shards = [collect(train_batches(splits, mixed, seed=2, epoch=0, rank=rank, world_size=2)) for rank in range(2)]
    for step in range(3):
        assert torch.equal(shards[0][step]["lam"], shards[1][step]["lam"])
        for shard in shards:
            assert sorted(shard[step]["y_b"].tolist()) == sorted(shard[step]["y_a"].tolist())


# --------------------------------------------------------------------------------------------------
# Errors: one line each, before anything is created


def layout(tmp_path: Path, *parts: str) -> Path:
    root = tmp_path / "layout"
    for part in parts:
        (root / part).mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize("build, error, says", [
    (lambda tmp, folder: "", ConfigError, "--data.root DIR is required with --data.name folder"),
    (lambda tmp, folder: tmp / "missing", DataError, "does not exist"),
    (lambda tmp, folder: layout(tmp, "test/ant"), DataError, "has no train/ folder"),
    (lambda tmp, folder: layout(tmp, "train/ant"), DataError, "has train/ but neither test/ nor val/"),
    (lambda tmp, folder: layout(tmp, "train", "test"), DataError, "no class folders in"),
    (lambda tmp, folder: layout(tmp, "train/ant", "test/ant"), DataError, "class folders of"),
])
def test_layout_errors(tmp_path, folder, build, error, says):
    root = build(tmp_path, folder)
    with pytest.raises(error) as raised:
        load_splits(DataConfig(name="folder", root=str(root), val_size=2, batch_size=2), seed=0)
    message = str(raised.value)
    assert says in message and "\n" not in message, message
    assert not (tmp_path / "missing").exists()


def test_unknown_class_and_empty_test_folders_are_refused(tmp_path, folder):
    root = tmp_path / "root"
    shutil.copytree(folder / "train", root / "train")
    (root / "test" / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match="class folders that train/ lacks: dog"):
        load_splits(config(root), seed=0)
    (root / "test" / "dog").rmdir()
    (root / "test" / "ant").mkdir()
    (root / "test" / "ant" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images in"):
        load_splits(config(root), seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, folder, workers):
    root = tmp_path / "root"
    shutil.copytree(folder, root)
    (root / "test" / "bee" / "bee_1.jpg").write_bytes(b"not a jpeg")
    cfg = config(root, workers=workers)
    splits = load_splits(cfg, seed=0)
    with pytest.raises(DataError) as raised:
        collect(eval_batches(splits.test, splits, cfg))
    message = str(raised.value)
    assert message.startswith("folder data: cannot read ") and "bee_1.jpg" in message and "\n" not in message


# --------------------------------------------------------------------------------------------------
# Through the CLI


def test_cli_trains_and_evaluates_on_a_folder(folder, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "recipes.ce", "--data.name", "folder", "--data.root", str(folder),
         "--data.image-size", "32", "--data.workers", "0", "--data.val-size", "6", "--data.batch-size", "6",
         "--data.eval-batch-size", "12", "--epochs", "1", "--compile", "False", "--student.arch", "resnet8",
         "--device", "cpu", "--disable-tqdm", "True", "--log-every", "1", "--out-dir", str(out),
         "--run-name", "folder"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "folder" / "summary.json").read_text())
    assert summary["dataset"].startswith(f"folder {folder} (3 classes, 32x32")
    assert "18 train / 6 val / 12 test" in summary["dataset"]
    for key in ("last_test_acc", "best_test_acc", "best_val_acc"):
        assert 0.0 <= summary[key] <= 100.0, key
    steps = [json.loads(line) for line in (out / "folder" / "metrics.jsonl").read_text().splitlines()]
    assert sum(record["kind"] == "step" for record in steps) == 3


def test_models_keep_imagenet_stems_for_large_images():
    """kd.config.setup: every model of a run on images larger than 64 px keeps the ImageNet stem."""
    from kd.config import setup
    from kd.methods.ibkd import IBKDConfig

    small = IBKDConfig(data=DataConfig(name="folder", root="x", image_size=64), device="cpu")
    large = IBKDConfig(data=DataConfig(name="folder", root="x", image_size=96), device="cpu")
    assert all(m.small_input for m in (setup(small)[0].student, *setup(small)[0].teachers))
    fitted = setup(large)[0]
    assert len(fitted.teachers) == 2 and not any(m.small_input for m in (fitted.student, *fitted.teachers))
