"""Distillation methods as plugins: one file per method holds its typed config, its loss and one
:class:`~kd.methods.base.Method` value; :data:`REGISTRY` names them. Every loss has one signature,

    make_loss(cfg, student, teachers, device, total_steps) -> Loss

where :class:`~kd.methods.base.Loss` holds ``fn(params, buffers, frozen, batch, step) -> (loss, (new_buffers,
metrics))``, the function the pure train step differentiates, with the method's trainable heads, its frozen
inputs and, for a method with stages (IB-KD's stage A), their hook; :func:`kd.train.distill` runs any of them.
Adding a method is one new file here and one line in :data:`REGISTRY` (plus a preset in recipes/ to run it
from the command line).
"""

from __future__ import annotations

from . import at, camkd, ce, dkd, ensemble_kd, fitnet, ibkd, kd
from .base import Method

REGISTRY: dict[str, Method] = {module.METHOD.name: module.METHOD for module in (ce, kd, dkd, at, fitnet, ensemble_kd, camkd, ibkd)}

__all__ = ["Method", "REGISTRY"]
