"""Distillation methods as plugins: one file per method holds its typed config, its loss and one
:class:`~kd.methods.base.Method` value; :data:`REGISTRY` names them. Every loss has one signature,

    make_loss(cfg, student, teachers, device, total_steps) -> (loss_fn, head_params, head_buffers)

with ``loss_fn(params, buffers, frozen, batch, step) -> (loss, (new_buffers, metrics))`` the function the
pure train step differentiates, and :func:`kd.train.distill` runs any of them. Adding a method is one new
file here and one line in :data:`REGISTRY` (plus a preset in recipes/ to run it from the command line).
IB-KD, whose stage A alternates with stage B, lives in kd/ibkd.py with its own driver (kd/ibkd_run.py).
"""

from __future__ import annotations

from . import at, ce, dkd, ensemble_kd, fitnet, kd
from .base import Method

REGISTRY: dict[str, Method] = {module.METHOD.name: module.METHOD for module in (ce, kd, dkd, at, fitnet, ensemble_kd)}

__all__ = ["Method", "REGISTRY"]
