"""Safetensors checkpoints (never pickle).

A checkpoint is a flat ``{"params/student/conv1.weight": tensor, ...}`` file written atomically (temp
file in the same folder, fsync, rename: a crash leaves the previous file intact) with string metadata:
``arch``, ``num_classes``, ``kind``, the resolved config as JSON, the code version, accuracies.
Loading checks the file and the metadata and fails with one line naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import tree as T
from .errors import CheckpointError

FORMAT = "asmb-kd/1"


def code_version() -> str:
    from . import __version__
    return __version__


def _as_storable(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared storage and non-contiguous tensors; a clone is cheap beside a disk write.
    return t.detach().to("cpu").contiguous().clone()


def save_checkpoint(path: str | os.PathLike, tree: T.Tree, metadata: dict[str, Any]) -> Path:
    """Write ``tree`` (nested dicts of tensors) and ``metadata`` (values JSON-encoded unless str)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: _as_storable(v) for k, v in T.flatten(tree).items()}
    meta = {"format": FORMAT, "code_version": code_version()}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    data = st_save(flat, metadata=meta)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return load_checkpoint(path)[1]


def load_checkpoint(path: str | os.PathLike, *, expect: dict[str, Any] | None = None,
                    device: str | torch.device = "cpu") -> tuple[T.Tree, dict[str, str]]:
    """Read a checkpoint; ``expect`` (e.g. ``{"arch": "resnet20", "num_classes": 10}``) must match
    the stored metadata, else :class:`CheckpointError` says which field differs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    try:
        flat = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
    except Exception as exc:  # safetensors raises several types for a bad header or a short file
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    meta: dict[str, str] = header.get("__metadata__", {}) or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an asmb-kd checkpoint (no '{FORMAT}' format tag)")
    for key, want in (expect or {}).items():
        have = meta.get(key)
        want_s = want if isinstance(want, str) else json.dumps(want)
        if have != want_s:
            raise CheckpointError(f"{path} holds {key}={_show(have)}, but this run needs {key}={_show(want_s)}")
    tree = T.unflatten({k: v.to(device) for k, v in flat.items()})
    return tree, meta


def _show(value: str | None) -> str:
    if value is None:
        return "<missing>"
    try:
        return str(json.loads(value))
    except json.JSONDecodeError:
        return value
