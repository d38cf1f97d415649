"""Safetensors checkpoints: round trip, atomic write, and one clear error per kind of bad file."""

import json

import pytest
import torch

from kd import tree as T
from kd.checkpoint import load_checkpoint, save_checkpoint
from kd.errors import CheckpointError


def _tree():
    return {"params": {"student": {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.randn(10)}},
            "step": torch.tensor(7, dtype=torch.int64),
            "rng": {"torch": torch.get_rng_state()}}


def test_round_trip_and_metadata(tmp_path):
    tree = _tree()
    path = save_checkpoint(tmp_path / "c.safetensors", tree, {"arch": "resnet20", "num_classes": 10,
                                                             "config": {"lr": 0.1}})
    loaded, meta = load_checkpoint(path, expect={"arch": "resnet20", "num_classes": 10})
    for k, v in T.flatten(tree).items():
        assert torch.equal(T.flatten(loaded)[k], v)
        assert T.flatten(loaded)[k].dtype == v.dtype
    assert json.loads(meta["config"]) == {"lr": 0.1}
    assert meta["arch"] == "resnet20" and "code_version" in meta
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_overwrite_is_atomic_replacement(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"a": torch.zeros(3)}, {"arch": "x"})
    save_checkpoint(path, {"a": torch.ones(3)}, {"arch": "x"})
    assert torch.equal(load_checkpoint(path)[0]["a"], torch.ones(3))


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    base = torch.randn(4, 6)
    tree = {"a": base, "b": base.t(), "c": base[1]}
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "s.safetensors", tree, {}))
    for k in tree:
        assert torch.equal(loaded[k], tree[k])


def _message(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "not found" in _message(e) and "nope.safetensors" in _message(e)


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "t.safetensors", _tree(), {"arch": "resnet20"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "truncated or corrupt" in _message(e) and "t.safetensors" in _message(e)


def test_not_safetensors(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, path)  # a pickle, as the original project wrote
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "model.pth" in _message(e)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(other)
    assert "not an asmb-kd checkpoint" in _message(e)


@pytest.mark.parametrize("field,stored,wanted", [("arch", "resnet20", "resnet56"), ("num_classes", 10, 100)])
def test_wrong_architecture_or_classes(tmp_path, field, stored, wanted):
    meta = {"arch": "resnet20", "num_classes": 10}
    path = save_checkpoint(tmp_path / "w.safetensors", _tree(), meta)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, expect={**meta, field: wanted})
    msg = _message(e)
    assert f"{field}={stored}" in msg and f"{field}={wanted}" in msg and "w.safetensors" in msg


def test_kind_is_checked_before_anything_else(tmp_path):
    path = save_checkpoint(tmp_path / "last.safetensors", _tree(), {"kind": "train_state", "arch": "resnet20"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, kind="weights", expect={"arch": "resnet56"})
    assert _message(e) == (f"{path} is a training-state checkpoint, not model weights: use best.safetensors or the "
                           f"teacher recipe's --ckpt")
    assert load_checkpoint(path, kind="train_state")[1]["kind"] == "train_state"


def test_read_metadata_reads_only_the_header(tmp_path):
    from kd.checkpoint import read_metadata
    path = save_checkpoint(tmp_path / "c.safetensors", _tree(), {"arch": "resnet20", "epoch": 3})
    assert read_metadata(path)["arch"] == "resnet20" and json.loads(read_metadata(path)["epoch"]) == 3
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        (tmp_path / "short.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{}")
        read_metadata(tmp_path / "short.safetensors")


def test_full_disk_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch):
    import errno
    import os

    from kd.errors import OutputError
    path = save_checkpoint(tmp_path / "c.safetensors", {"a": torch.zeros(3)}, {"arch": "x"})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError) as e:
        save_checkpoint(path, {"a": torch.ones(3)}, {"arch": "x"})
    assert _message(e).startswith(f"cannot write {path}: no space left on device")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's private 0600


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask
