"""Supervised training of one classifier: the teacher fine-tuning recipe and the CE baseline.

Read top to bottom: data -> network -> loss -> pure step -> loop -> report.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .config import ModelConfig, RunConfig, load_run_config, resolve_device, to_json
from .data import load_splits, steps_per_epoch
from .modeling import Net, build_net
from .optim import build_optimizer, lr_schedule
from .run import Run, final_report, load_train_state, say, train_loop
from .step import apply_model, compile_step, init_state, make_eval_fn, make_train_step, mixed_cross_entropy


def classifier_loss(net: Net, part: str, label_smoothing: float):
    """``loss_fn`` for :func:`kd.step.make_train_step`: mixed-target CE with label smoothing."""

    def loss_fn(params, buffers, frozen, batch, step):
        logits, _, new_buffers = apply_model(net.train_skeleton, params[part], buffers[part], batch["x"], train=True)
        loss = mixed_cross_entropy(logits, batch, label_smoothing)
        return loss, ({part: new_buffers}, {"ce": loss.detach()})

    return loss_fn


def constant(value: float, device: torch.device):
    threshold = torch.tensor(float(value), device=device)
    return lambda step: threshold


def train_classifier(cfg: RunConfig, recipe: str, model_cfg: ModelConfig, *, part: str, label_smoothing: float,
                     grad_clip_norm: float, ema: bool, cfg_type: type | None = None) -> tuple[Run, dict[str, Any]]:
    if cfg.resume:
        cfg = _resumed(cfg, cfg_type or type(cfg))
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data, cfg.seed)
    run = Run.create(cfg, recipe)
    say(f"run {run.root}  |  {splits.description}  |  {part} {model_cfg.arch}  |  device {device}")

    net = build_net(model_cfg, splits.num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed)
    meta = net.meta(model_cfg, splits.name)
    spe = steps_per_epoch(splits, cfg.data)
    optimizer = build_optimizer(cfg.optim)
    train_step = make_train_step(classifier_loss(net, part, label_smoothing), optimizer,
                                 lr_schedule(cfg.optim, spe, cfg.epochs),
                                 clip_fn=constant(grad_clip_norm, device), amp=cfg.amp, device_type=device.type)
    state = init_state({part: net.params}, {part: net.buffers}, optimizer, ema=ema, amp=cfg.amp)
    resume_info = None
    if cfg.resume and run.path("last.safetensors").exists():
        state, resume_info = load_train_state(run.path("last.safetensors"), expect={"arch": net.arch},
                                              device=device, like=state)
        say(f"resuming from epoch {resume_info['epoch']}")

    eval_fn = compile_step(make_eval_fn(net.eval_skeleton), cfg.compile)
    t0 = time.perf_counter()
    result = train_loop(cfg, run, state=state, train_step=compile_step(train_step, cfg.compile), splits=splits,
                        device=device, part=part, eval_fn=eval_fn, weight_meta=meta, resume_info=resume_info)
    accuracies = final_report(run, state=result.state, part=part, eval_fn=eval_fn, splits=splits, cfg=cfg,
                              device=device, weight_meta=meta)
    summary = {"recipe": recipe, "dataset": splits.description, part: model_cfg.arch,
               "num_parameters": meta["num_parameters"], "epochs": cfg.epochs, "seed": cfg.seed,
               "wall_seconds": time.perf_counter() - t0, "train_seconds": result.train_seconds,
               "images_per_second": result.images_per_second, **accuracies}
    run.write_summary(summary)
    print_accuracy_table(summary)
    return run, summary


def print_accuracy_table(summary: dict[str, Any]) -> None:
    rows = [k[: -len("_test_acc")] for k in summary if k.endswith("_test_acc")]
    say("\n| weights | val acc (%) | test acc (%) |\n|---|---|---|")
    for row in rows:
        say(f"| {row} | {summary[row + '_val_acc']:.2f} | {summary[row + '_test_acc']:.2f} |")


def _resumed(cfg: RunConfig, cfg_type: type) -> RunConfig:
    """The saved config of the run being resumed, keeping only this invocation's bookkeeping fields."""
    import dataclasses

    saved = load_run_config(cfg_type, cfg.resume)
    return dataclasses.replace(saved, resume=cfg.resume, disable_tqdm=cfg.disable_tqdm)


__all__ = ["train_classifier", "classifier_loss", "print_accuracy_table", "to_json"]
