"""The driver of every method of :mod:`kd.methods` (CE, teacher fine-tuning and the distillation baselines),
read top to bottom:

resolve the config and ``--resume`` -> fine-tune missing teachers -> data and run directory -> frozen teachers
-> student -> the method's loss and heads -> the pure step, its loop and the report (:mod:`kd.supervised`).
IB-KD, whose stage A alternates with stage B, has its own driver (:mod:`kd.ibkd_run`).
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig
from .data import steps_per_epoch
from .methods.base import Method
from .modeling import build_net
from .supervised import Extras, prepare, resolve_resume, train_network
from .teacher_outputs import teacher_outputs_for
from .teachers import TEACHER_HASHES, ensure_teacher, load_teacher, teacher_hashes


def distill(cfg: RunConfig, method: Method, recipe: str) -> dict[str, Any]:
    """Train ``cfg.student`` (``cfg.teacher`` for teacher fine-tuning: ``method.part``) with ``method``'s loss
    against its frozen teachers (none for CE); the summary's ``method`` is ``recipe`` (a variant's name keeps
    its runs apart in a report)."""
    cfg = resolve_resume(cfg)
    specs = method.teachers(cfg)
    for name, (model, ckpt) in specs.items():
        ensure_teacher(cfg, model, ckpt, cfg.teacher_epochs, f"--{name}")
    cfg, device, splits, run = prepare(cfg, recipe)
    teachers = {name: load_teacher(model, ckpt, splits.num_classes, device, channels_last=cfg.channels_last,
                                   fold_bn=cfg.fold_teacher_bn, dataset=splits.name)
                for name, (model, ckpt) in specs.items()}
    extras = Extras()
    if specs:
        ckpts = {name: ckpt for name, (_, ckpt) in specs.items()}
        hashes = teacher_hashes(ckpts, run.root if cfg.resume else None)
        shared = teacher_outputs_for(cfg, {name: (net, hashes[name]) for name, net in teachers.items()}, splits,
                                     device, method=recipe, maps=method.maps)
        extras = Extras(frozen={name: {"params": net.params, "buffers": net.buffers} for name, net in teachers.items()},
                        summary={"method": recipe, "teachers": [model.arch for model, _ in specs.values()]},
                        teacher_outputs=shared, meta={TEACHER_HASHES: hashes})
    model = getattr(cfg, method.part)  # the trained network: cfg.student (cfg.teacher when fine-tuning one)
    net = build_net(model, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed,
                    flag=f"--{method.part}")
    total_steps = steps_per_epoch(splits, cfg.data) * cfg.epochs
    loss_fn, extras.params, extras.buffers = method.make_loss(cfg, net, teachers, device, total_steps)
    return train_network(cfg, recipe, run, splits, device, net, model, part=method.part, loss_fn=loss_fn,
                         grad_clip_norm=cfg.grad_clip_norm, ema=cfg.ema, extras=extras)
