"""The one driver of every method of :mod:`kd.methods` (CE, teacher fine-tuning, the baselines and IB-KD),
read top to bottom:

resolve the config and ``--resume`` -> fine-tune missing teachers -> data and run directory -> frozen teachers
-> the trained network -> the method's loss, heads and stages -> the pure compiled step -> resume -> for each
stage: the method's work before it (IB-KD's stage A), then the student epochs (:func:`kd.loop.train_loop`) ->
the final report and the summary.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .config import RunConfig, compile_mode
from .checkpoint import load_train_state
from .data import steps_per_epoch
from .distributed import convert_sync_bn, world
from .loop import final_report, train_loop, training_batches
from .methods.base import Loss, Method
from .modeling import build_net
from .optim import build_optimizer, lr_schedule
from .rundir import say
from .step import compile_step, init_state, make_eval_fn, make_train_step
from .supervised import constant, prepare, print_accuracy_table, resolve_resume
from .teacher_outputs import teacher_outputs_for
from .teachers import TEACHER_HASHES, ensure_teacher, load_teacher, teacher_hashes


def stage_boundaries(epochs: int, stages: int) -> list[tuple[int, int]]:
    """Student epochs split across stages as ``[(first, end), ...]`` (the remainder goes to the last stages)."""
    base, extra = divmod(epochs, stages)
    bounds, start = [], 0
    for k in range(stages):
        end = start + base + (1 if k >= stages - extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def build_step(cfg: RunConfig, loss: Loss, spe: int, epochs: int, device: torch.device):
    """The pure train step of ``loss`` (compiled when ``cfg.compile``) and its optimizer: the run's optimizer and
    learning-rate schedule over ``spe * epochs`` steps, the loss's clipping schedule (or the constant
    ``cfg.grad_clip_norm``), the run's mixed precision."""
    optimizer = build_optimizer(cfg.optim)
    clip = loss.clip or constant(getattr(cfg, "grad_clip_norm", 0.0), device)
    step = make_train_step(loss.fn, optimizer, lr_schedule(cfg.optim, spe, epochs), clip_fn=clip, amp=cfg.amp,
                           device_type=device.type)
    return compile_step(step, cfg.compile, mode=compile_mode(cfg)), optimizer


def distill(cfg: RunConfig, method: Method, recipe: str, *, flag: str | None = None) -> dict[str, Any]:
    """Train ``cfg.student`` (``cfg.teacher`` for teacher fine-tuning: ``method.part``) with ``method``'s loss
    against its frozen teachers ``cfg.teachers`` (none for CE); the summary's ``method`` is ``recipe`` (a variant's
    name keeps its runs apart in a report). ``flag``: the command line's name of the trained network, which
    errors name (default ``--student`` / ``--teacher``)."""
    cfg = resolve_resume(cfg)
    specs = method.teacher_specs(cfg)
    flags = {name: f"--teachers.{i}" for i, name in enumerate(specs)}
    for name, spec in specs.items():
        ensure_teacher(cfg, spec, cfg.teacher_epochs, flags[name])
    cfg, device, splits, run = prepare(cfg, recipe)
    part, model = method.part, getattr(cfg, method.part)  # the trained network: cfg.student (cfg.teacher)
    say(f"run {run.root}  |  {splits.description}  |  {part} {model.arch}  |  device {device}"
        + (f"  |  teachers {' + '.join(spec.arch for spec in specs.values())}" if specs else ""))
    t0 = time.perf_counter()
    teachers = {name: load_teacher(spec, spec.ckpt, splits.num_classes, device, channels_last=cfg.channels_last,
                                   fold_bn=cfg.fold_teacher_bn, dataset=splits.name, flag=flags[name])
                for name, spec in specs.items()}
    hashes = teacher_hashes({name: spec.ckpt for name, spec in specs.items()}, run.root if cfg.resume else None)
    shared = teacher_outputs_for(cfg, {name: (net, hashes[name]) for name, net in teachers.items()}, splits, device,
                                 method=recipe, maps=method.reads_maps(cfg)) if specs else None

    net = build_net(model, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed,
                    flag=flag or f"--{part}")
    if cfg.dist.sync_bn and world().size > 1:
        convert_sync_bn(net.train_skeleton)
    spe = steps_per_epoch(splits, cfg.data)
    loss = method.make_loss(cfg, net, teachers, device, spe * cfg.epochs)
    step, optimizer = build_step(cfg, loss, spe, cfg.epochs, device)
    frozen = {**{name: {"params": t.params, "buffers": t.buffers} for name, t in teachers.items()}, **loss.frozen}
    state = init_state({part: net.params, **loss.params}, {part: net.buffers, **loss.buffers}, optimizer,
                       frozen=frozen, ema=cfg.ema, amp=cfg.amp)
    meta = {**net.meta(model, splits.name), "kernels": cfg.kernels, **({TEACHER_HASHES: hashes} if specs else {})}
    info: dict[str, Any] = {"epoch": 0}
    # run.root, not run.path(): a resume refused here (another network) must leave the run as it was.
    if cfg.resume and (run.root / "last.safetensors").exists():
        state, info = load_train_state(run.root / "last.safetensors", expect={"arch": net.arch}, device=device,
                                       like=state)
        say(f"resuming {run.root} after epoch {info['epoch']}")

    summary: dict[str, Any] = {"recipe": recipe, "run_dir": str(run.root), "dataset": splits.description,
                               part: model.arch}
    if specs:
        summary.update(method=recipe, teachers=[spec.arch for spec in specs.values()])
    if loss.stages is not None:
        summary.update(loss.stages.start(run, splits))
    eval_fn = compile_step(make_eval_fn(net.eval_skeleton), cfg.compile, mode=compile_mode(cfg))
    batches = shared.wrap(training_batches(cfg, splits, device)) if shared is not None else None
    last_val = None  # the final epoch's validation accuracies, when this invocation trains it
    stages = stage_boundaries(cfg.epochs, loss.stages.count if loss.stages is not None else 1)
    for k, (start, end) in enumerate(stages):
        if loss.stages is not None:
            state, numbers = loss.stages.before(k, state, done=info["epoch"] > start)
            summary.update(numbers)
        if info["epoch"] >= end:
            continue
        result = train_loop(cfg, run, state=state, train_step=step, splits=splits, device=device, part=part,
                            eval_fn=eval_fn, weight_meta=meta, epochs=end, batches=batches,
                            resume_info={**info, "epoch": max(info["epoch"], start)})
        state, last_val = result.state, result.last_val
        info = {"epoch": end, "best_val": result.best_val, "best_ema_val": result.best_ema_val,
                "train_seconds": result.train_seconds, "images_seen": result.images_seen}
        if loss.stages is not None:
            summary[f"stage{k + 1}_{part}_val_acc"] = result.best_val
    accuracies = final_report(run, state=state, part=part, eval_fn=eval_fn, splits=splits, cfg=cfg, device=device,
                              weight_meta=meta, last_val=last_val)
    train_seconds = float(info.get("train_seconds", 0.0))
    summary.update({"num_parameters": meta["num_parameters"], "epochs": cfg.epochs, "seed": cfg.seed,
                    "wall_seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
                    "images_per_second": int(info.get("images_seen", 0)) / max(train_seconds, 1e-9), **accuracies,
                    **(shared.report() if shared is not None else {})})
    run.write_summary(summary)
    print_accuracy_table(summary)
    return summary
