"""Safetensors checkpoints (never pickle).

A checkpoint is a flat ``{"params/student/conv1.weight": tensor, ...}`` file written atomically (temp
file in the same folder, fsync, rename: a crash leaves the previous file intact) with string metadata:
``arch``, ``num_classes``, ``kind``, the resolved config as JSON, the code version, accuracies.
Loading checks the file and the metadata and fails with one line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import tree as T
from .distributed import world
from .errors import CheckpointError, writing

FORMAT = "asmb-kd/1"


def code_version() -> str:
    from . import __version__
    return __version__


def _as_storable(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared storage and non-contiguous tensors; a clone is cheap beside a disk write.
    return t.detach().to("cpu").contiguous().clone()


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (what identifies a teacher checkpoint across runs and resumes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync and rename: a crash or a full
    disk leaves the previous file intact (an interrupted write can leave a ``*.tmp`` file, which a resumed run
    removes). A full disk or an unwritable folder is one :class:`OutputError` naming ``path``."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the group
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def save_checkpoint(path: str | os.PathLike, tree: T.Tree, metadata: dict[str, Any]) -> Path:
    """Write ``tree`` (nested dicts of tensors) and ``metadata`` (values JSON-encoded unless str)."""
    flat = {k: _as_storable(v) for k, v in T.flatten(tree).items()}
    meta = {"format": FORMAT, "code_version": code_version()}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return write_atomically(path, st_save(flat, metadata=meta))


# What each ``kind`` of checkpoint is, for error messages.
KINDS = {"weights": "model weights", "train_state": "a training-state checkpoint", "mbm": "an MBM checkpoint"}


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (give the .safetensors file itself)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")


def _read(path: Path) -> bytes:
    _check_is_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {(exc.strerror or type(exc).__name__).lower()}") from None


def _header(path: Path, raw: bytes) -> dict[str, str]:
    """The string metadata of an asmb-kd checkpoint, checked for the format tag."""
    try:
        header_len = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 or len(raw) < 8 + header_len:
            raise ValueError(f"its header length ({header_len:,} bytes) exceeds the file")
        header = json.loads(raw[8:8 + header_len])
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except Exception as exc:  # a short file, a bad length, a header that is not JSON
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    meta: dict[str, str] = header.get("__metadata__", {}) or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an asmb-kd checkpoint (no '{FORMAT}' format tag)")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata alone (reads the header, not the tensors)."""
    path = Path(path)
    _check_is_file(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            # Trust no length read from disk: a header longer than the file is corruption, not a read size.
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            raw = head + f.read(length) if 0 < length <= size - 8 else head
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {(exc.strerror or type(exc).__name__).lower()}") from None
    return _header(path, raw)


def load_checkpoint(path: str | os.PathLike, *, expect: dict[str, Any] | None = None, kind: str | None = None,
                    device: str | torch.device = "cpu") -> tuple[T.Tree, dict[str, str]]:
    """Read a checkpoint; its ``kind`` metadata must equal ``kind`` when given, and ``expect`` (e.g.
    ``{"arch": "resnet20", "num_classes": 10}``) must match the stored metadata, else
    :class:`CheckpointError` says what the file is or which field differs."""
    path = Path(path)
    raw = _read(path)
    meta = _header(path, raw)
    if kind is not None and meta.get("kind") != kind:
        have = meta.get("kind")
        what = KINDS.get(have, f"a {have!r} checkpoint") if have else "a checkpoint without a kind"
        hint = ": use best.safetensors or the teacher recipe's --ckpt" if kind == "weights" else ""
        raise CheckpointError(f"{path} is {what}, not {KINDS.get(kind, kind)}{hint}")
    for key, want in (expect or {}).items():
        have = meta.get(key)
        want_s = want if isinstance(want, str) else json.dumps(want)
        if have != want_s:
            raise CheckpointError(f"{path} holds {key}={_show(have)}, but this run needs {key}={_show(want_s)}")
    try:
        flat = st_load(raw)
    except Exception as exc:  # safetensors raises several types for a bad header or a short file
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # Fresh allocations: a tensor read from the file's bytes sits at whatever offset its header left, and the
    # BLAS kernels' rounding can depend on the alignment of their inputs (a resumed run would then differ from an
    # uninterrupted one in the last bits); allocated tensors are aligned like every other.
    tree = T.unflatten({k: torch.empty_like(v, device=device).copy_(v) for k, v in flat.items()})
    return tree, meta


def _show(value: str | None) -> str:
    if value is None:
        return "<missing>"
    try:
        return str(json.loads(value))
    except json.JSONDecodeError:
        return value


# Model weights and train states: what the train loop writes and a resume or a teacher load reads.


def save_weights(path: Path, params: T.Tree, buffers: T.Tree, meta: dict[str, Any]) -> None:
    """Every trainable part (student and its heads/regressors), without optimizer state (rank 0 writes)."""
    if not world().main:
        return
    save_checkpoint(path, {"params": params, "buffers": buffers}, {"kind": "weights", **meta})


def load_weights(path: str | Path, *, expect: dict[str, Any], device: torch.device) -> tuple[T.Tree, T.Tree, dict[str, str]]:
    """Model weights (``kind`` "weights": a run's best*.safetensors, a teacher recipe's --ckpt); a train
    state or another kind of checkpoint given instead is one :class:`CheckpointError` saying so."""
    tree, meta = load_checkpoint(path, expect=expect, kind="weights", device=device)
    return tree.get("params", {}), tree.get("buffers", {}), meta


def save_train_state(path: Path, state: T.Tree, meta: dict[str, Any]) -> None:
    if not world().main:
        return
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_checkpoint(path, {"state": state, "rng": rng}, {"kind": "train_state", **meta})


def load_train_state(path: Path, *, expect: dict[str, Any], device: torch.device, like: T.Tree
                     ) -> tuple[T.Tree, dict[str, Any]]:
    """Restore a train state saved by :func:`save_train_state`; restores the RNG too."""
    tree, meta = load_checkpoint(path, expect=expect, device=device)
    flat = T.flatten(tree["state"])
    want, have = set(T.flatten(like)), set(flat)
    if want != have:
        missing = sorted(want - have)[:3]
        raise CheckpointError(f"{path} does not match this run's state (missing e.g. {missing})")
    # Keep dtypes of the live state (e.g. step int64) and the device.
    state = T.tree_map(lambda ref, s: s.to(device=ref.device, dtype=ref.dtype), like, T.fill(like, flat))
    torch.set_rng_state(tree["rng"]["torch"].cpu())
    if "cuda" in tree["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(tree["rng"]["cuda"].cpu())
    info = {k: json.loads(v) for k, v in meta.items() if k in
            ("epoch", "best_val", "best_ema_val", "train_seconds", "images_seen")}
    return state, info
