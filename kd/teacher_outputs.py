"""Frozen teachers' outputs computed once and shared by every run that trains on the same batches.

The methods of one comparison (kd, dkd, ensemble_kd, IB-KD and its ablations) train different students on
the *same* batches: the data stream depends only on the data config, the seed and the epoch, never on the
model. Their frozen teachers therefore produce the same logits and pooled features in every run, and the
teachers' forwards are the larger part of a small student's step. :class:`TeacherOutputs` computes them
outside the train step (eval mode, inference mode, the step's autocast), writes them per epoch under a
directory named by everything that determines them, and later runs read them back instead of running the
teachers again. Every batch is matched by a hash of its images, so a mismatch (another data stream, a
changed pipeline) is recomputed, never silently reused.

The losses read the outputs with :func:`kd.step.frozen_teacher`: from the batch when this stream put them there,
otherwise by the usual no-grad forward inside the step. Feature maps (AT, FitNet, IB-KD's feature term) are
not stored (they are 10-100x larger): methods that read them keep the forward in the step.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from .checkpoint import write_atomically
from .errors import OutputError
from .modeling import Net
from .step import AmpConfig, apply_model, autocast_dtype, batch_key

FORMAT = 1

def image_hash(x: Tensor) -> bytes:
    """16 bytes identifying a batch's images (shape, dtype and every value)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


def stream_fingerprint(parts: dict[str, Any]) -> str:
    """The directory name of one stream's outputs: a hash of what determines them (JSON-serialisable)."""
    return hashlib.sha256(json.dumps({"format": FORMAT, "torch": torch.__version__, **parts}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:20]


class TeacherOutputs:
    """Adds every frozen teacher's logits and pooled features to each training batch, read from ``root``
    when an earlier run stored them for the same batch, else computed (and stored when the epoch ends).

    ``identity``: what, besides the batch's images, determines the outputs (teacher checkpoints' hashes,
    BatchNorm folding, memory format, autocast, data config, seed, rank): it names the directory.
    ``hits`` / ``misses`` count batches; ``seconds`` is the time spent computing or reading them."""

    def __init__(self, root: str | Path, teachers: dict[str, Net], identity: dict[str, Any], *,
                 device: torch.device, amp: AmpConfig | None = None, rank: int = 0, write: bool = True,
                 max_bytes: float = float("inf"), images_per_run: int = 0):
        self.teachers = teachers
        self.identity = identity
        self.dir = Path(root) / stream_fingerprint(identity)
        self.device = device
        self.dtype = autocast_dtype(amp) if amp is not None else None
        self.rank = rank
        self.write = write
        self.hits = self.misses = 0
        self.seconds = 0.0
        self.max_bytes, self.images_per_run = max_bytes, images_per_run
        self._size_checked = False
        if write:  # before any training: a directory that cannot be made is an error now, not after an epoch
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"--teacher-cache {root}: cannot create {self.dir} "
                                  f"({(exc.strerror or type(exc).__name__).lower()})") from None

    def path(self, epoch: int) -> Path:
        return self.dir / f"epoch{epoch:04d}-rank{self.rank}.safetensors"

    def _load(self, epoch: int) -> dict[str, Tensor]:
        path = self.path(epoch)
        if not path.exists():
            return {}
        try:
            return load_file(str(path))
        except Exception:  # noqa: BLE001  (a truncated or foreign file: recompute and rewrite it)
            return {}

    @torch.inference_mode()
    def _compute(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            for name, net in self.teachers.items():
                logits, features, _ = apply_model(net.eval_skeleton, net.params, net.buffers, x, train=False)
                out[batch_key(name, "logits")] = logits.clone()
                out[batch_key(name, "pooled")] = features["pooled"].clone()
        return out

    def wrap(self, batches: Callable[[int], Iterator[dict[str, Tensor]]]
             ) -> Callable[[int], Iterator[dict[str, Tensor]]]:
        """``batches(epoch)`` with the teachers' outputs added to every batch."""
        def with_outputs(epoch: int) -> Iterator[dict[str, Tensor]]:
            stored = self._load(epoch)
            hashes = stored.get("image_hash")
            rows: list[dict[str, Tensor]] = []
            missed = False
            for i, batch in enumerate(batches(epoch)):
                t0 = time.perf_counter()
                digest = image_hash(batch["x"])
                if hashes is not None and i < len(hashes) and bytes(hashes[i].tolist()) == digest:
                    host = {key: stored[f"{i}/{key}"] for key in self._keys()}  # kept as read for a rewrite
                    out = {key: value.to(self.device, non_blocking=True) for key, value in host.items()}
                    self.hits += 1
                else:
                    out = self._compute(batch["x"])
                    host = {key: value.detach().cpu() for key, value in out.items()}
                    self.misses += 1
                    missed = True
                    if not self._size_checked:
                        self._check_size(out, len(batch["x"]))
                rows.append({"image_hash": torch.frombuffer(bytearray(digest), dtype=torch.uint8), **host})
                self.seconds += time.perf_counter() - t0
                yield {**batch, **out}
            if missed and self.write and rows:  # the whole epoch was seen: store it for the next run
                self._store(epoch, rows)
        return with_outputs

    def _check_size(self, out: dict[str, Tensor], batch_images: int) -> None:
        """Stop storing (reads go on) when the whole run's outputs would exceed ``max_bytes``."""
        self._size_checked = True
        per_image = sum(v.numel() * v.element_size() for v in out.values()) / max(batch_images, 1)
        total = per_image * self.images_per_run
        if self.write and total > self.max_bytes:
            from .rundir import say
            self.write = False
            say(f"teachers' outputs not stored: about {total / 1e9:.1f} GB for this run, above "
                f"--teacher-cache-max-gb {self.max_bytes / 1e9:g} (raise it to share them)")

    def _keys(self) -> list[str]:
        return [batch_key(name, what) for name in self.teachers for what in ("logits", "pooled")]

    def _store(self, epoch: int, rows: list[dict[str, Tensor]]) -> None:
        tensors = {"image_hash": torch.stack([r["image_hash"] for r in rows])}
        for i, row in enumerate(rows):
            tensors.update({f"{i}/{key}": row[key].contiguous() for key in self._keys()})
        write_atomically(self.path(epoch), save(tensors))
        if not (self.dir / "identity.json").exists():  # what these outputs are of, for a reader
            write_atomically(self.dir / "identity.json", json.dumps(self.identity, indent=1, sort_keys=True,
                                                                    default=str).encode())

    def report(self) -> dict[str, Any]:
        """Summary fields: batches read back, batches computed, seconds spent on either."""
        return {"teacher_outputs_hits": self.hits, "teacher_outputs_misses": self.misses,
                "teacher_outputs_seconds": round(self.seconds, 3), "teacher_outputs_dir": str(self.dir)}


def teacher_outputs_for(cfg: Any, teachers: dict[str, tuple[Net, str]], splits: Any,
                        device: torch.device, *, method: str, maps: bool = False) -> TeacherOutputs | None:
    """The shared outputs of a run's frozen teachers (``{name: (net, sha256 of its checkpoint file)}``, the
    hashes :func:`kd.teachers.teacher_hashes` recorded for the run, so no file is read twice) when
    ``cfg.teacher_cache`` names a directory, else None. ``maps``: the loss reads the teachers' feature maps,
    which are not stored, so nothing is shared (one line says so). ``method`` is named in the notices."""
    from .config import to_dict
    from .data import steps_per_epoch
    from .distributed import world
    from .rundir import say

    if not cfg.teacher_cache:
        return None
    if maps:
        say(f"{method}: --teacher-cache not used (the loss reads the teachers' feature maps, which are not stored)")
        return None
    w = world()
    identity = {
        "teachers": {name: {"arch": net.arch, "sha256": digest, "num_classes": net.num_classes}
                     for name, (net, digest) in teachers.items()},
        "fold_bn": bool(getattr(cfg, "fold_teacher_bn", False)), "channels_last": cfg.channels_last,
        "amp": to_dict(cfg.amp), "data": to_dict(cfg.data), "dataset": splits.description, "seed": cfg.seed,
        "rank": w.rank, "world_size": w.size, "device": device.type,
    }
    outputs = TeacherOutputs(cfg.teacher_cache, {name: net for name, (net, _) in teachers.items()}, identity,
                             device=device, amp=cfg.amp, rank=w.rank, max_bytes=cfg.teacher_cache_max_gb * 1e9,
                             images_per_run=steps_per_epoch(splits, cfg.data) * cfg.data.batch_size * cfg.epochs)
    say(f"{method}: the teachers' outputs are shared through {outputs.dir}")
    return outputs
