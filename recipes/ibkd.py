"""ASMB IB-KD: two fine-tuned teachers fused by an information bottleneck (MBM) distil into a student."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from kd import tree as T
from kd.checkpoint import save_checkpoint
from kd.config import ModelConfig, RunConfig
from kd.data import steps_per_epoch
from kd.errors import ConfigError
from kd.ibkd import (FeatureCache, StageAConfig, StageBConfig, StageBParts, build_cache, cached_batches, mbm_accuracy,
                     stage_a_loss, stage_b_clip, stage_b_loss)
from kd.mbm import MBM, MBMConfig, ProjectionHead
from kd.models import feature_shapes
from kd.modeling import build_net
from kd.optim import adamw, build_optimizer, lr_schedule
from kd.run import final_report, load_train_state, say, train_loop
from kd.step import compile_step, init_state, make_eval_fn, make_train_step, read_metrics
from kd.supervised import constant, prepare, print_accuracy_table, resolve_resume

from ._cli import parse
from ._distill import STUDENT_DATA, STUDENT_OPTIM, ensure_teacher, load_teacher


@dataclass(frozen=True)
class IBKDConfig(RunConfig):
    """Multi-teacher IB-KD (SPEC 6)."""

    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """The student network."""
    teacher1: ModelConfig = ModelConfig(arch="resnet152", pretrained=True)
    """First teacher (weights from --teacher1-ckpt)."""
    teacher1_ckpt: str = "checkpoints/resnet152_ft.safetensors"
    """First teacher's fine-tuned weights; fine-tuned first when missing."""
    teacher2: ModelConfig = ModelConfig(arch="efficientnet_b2", pretrained=True)
    """Second teacher (weights from --teacher2-ckpt)."""
    teacher2_ckpt: str = "checkpoints/efficientnet_b2_ft.safetensors"
    """Second teacher's fine-tuned weights; fine-tuned first when missing."""
    teacher_epochs: int = 30
    """Fine-tuning epochs for a teacher whose checkpoint is missing."""
    mbm: MBMConfig = field(default_factory=MBMConfig)
    """The bottleneck module."""
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    """Stage A (MBM on frozen teachers)."""
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    """Stage B (student) loss weights and schedules."""
    num_stages: int = 1
    """Alternations of stage A then stage B; the student epochs are split across stages."""
    grad_clip_norm_init: float = 1.0
    """Stage B clipping threshold while progress < grad_clip_warmup_frac."""
    grad_clip_norm_final: float = 0.0
    """Threshold reached linearly at the end (0 = clipping switched off, never clipping to zero)."""
    grad_clip_warmup_frac: float = 0.5
    """Progress fraction before the threshold starts moving."""
    ema: bool = True
    """EMA of the student (and its BN statistics), updated every step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_stages < 1 or self.num_stages > self.epochs:
            raise ValueError(f"num_stages must be in [1, epochs], got {self.num_stages}")
        if self.stage_a.cache_views < 1:
            raise ValueError(f"stage_a.cache_views must be >= 1, got {self.stage_a.cache_views}")


CONFIG = IBKDConfig(data=STUDENT_DATA, optim=STUDENT_OPTIM, epochs=90)


def stage_boundaries(epochs: int, stages: int) -> list[tuple[int, int]]:
    """Student epochs split across stages (the remainder goes to the last stages)."""
    base, extra = divmod(epochs, stages)
    bounds, start = [], 0
    for k in range(stages):
        end = start + base + (1 if k >= stages - extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def run_stage_a(cfg: IBKDConfig, run_dir, stage: int, mbm_train: MBM, mbm_eval: MBM, mbm_params: T.Tree,
                caches: dict[str, FeatureCache], device: torch.device) -> tuple[T.Tree, dict[str, float]]:
    """Train the MBM on cached teacher features; keep the best-by-validation synergy accuracy."""
    torch.manual_seed(cfg.seed * 1000 + stage)  # a resumed run redoes stage A identically
    a = cfg.stage_a
    optimizer = adamw(weight_decay=a.weight_decay, decoupled=False)  # Adam with L2 decay
    lr = torch.tensor(a.lr, device=device)
    step = compile_step(make_train_step(stage_a_loss(mbm_train, a.beta), optimizer, lambda s: lr,
                                        clip_fn=constant(a.grad_clip_norm, device), device_type=device.type),
                        cfg.compile)
    state = init_state({"mbm": mbm_params}, {}, optimizer, ema=False)
    val_pooled, val_labels = caches["val"].pooled[0], caches["val"].labels
    best_val, best_params = -1.0, mbm_params
    for epoch in range(a.epochs):
        metrics = {}
        for batch in cached_batches(caches["train"], min(a.batch_size, len(caches["train"].labels)),
                                    seed=cfg.seed * 1000 + stage, epoch=epoch):
            state, metrics = step(state, batch)
        logged = read_metrics(metrics)
        val = mbm_accuracy(mbm_eval, state["params"]["mbm"], val_pooled, val_labels)
        run_dir.log({"kind": "epoch", "stage": f"A{stage + 1}", "epoch": epoch + 1, "synergy_val_acc": val, **logged})
        if val > best_val:
            best_val, best_params = val, T.clone(state["params"]["mbm"])
    test = mbm_accuracy(mbm_eval, best_params, caches["test"].pooled[0], caches["test"].labels)
    say(f"[stage A{stage + 1}] {a.epochs} epochs  loss {logged.get('loss', float('nan')):.4f}  "
        f"synergy val {best_val:.2f}%  test {test:.2f}% (best by val)")
    save_checkpoint(run_dir.path(f"mbm_stage{stage + 1}.safetensors"), {"params": {"mbm": best_params}},
                    {"kind": "mbm", "arch": f"mbm-{cfg.mbm.kind}", "synergy_val_acc": best_val, "synergy_test_acc": test})
    return best_params, {"synergy_val_acc": best_val, "synergy_test_acc": test}


def run(cfg: IBKDConfig, recipe: str = "ibkd") -> dict:
    cfg = resolve_resume(cfg)
    ensure_teacher(cfg, cfg.teacher1, cfg.teacher1_ckpt, cfg.teacher_epochs)
    ensure_teacher(cfg, cfg.teacher2, cfg.teacher2_ckpt, cfg.teacher_epochs)
    cfg, device, splits, run_dir = prepare(cfg, recipe)
    say(f"run {run_dir.root}  |  {splits.description}  |  teachers {cfg.teacher1.arch} + {cfg.teacher2.arch}  |  "
        f"student {cfg.student.arch}  |  device {device}")
    t0 = time.perf_counter()
    k = splits.num_classes
    teachers = tuple(load_teacher(m, c, k, device, channels_last=cfg.channels_last)
                     for m, c in ((cfg.teacher1, cfg.teacher1_ckpt), (cfg.teacher2, cfg.teacher2_ckpt)))

    # Teacher features, computed once (the teachers are frozen).
    caches = {
        "train": build_cache(teachers, splits.train, splits, cfg.data, views=cfg.stage_a.cache_views, seed=cfg.seed,
                             device=device, channels_last=cfg.channels_last),
        "val": build_cache(teachers, splits.val, splits, cfg.data, views=1, seed=cfg.seed, device=device,
                           channels_last=cfg.channels_last),
        "test": build_cache(teachers, splits.test, splits, cfg.data, views=1, seed=cfg.seed, device=device,
                            channels_last=cfg.channels_last),
    }
    summary: dict = {"recipe": recipe, "method": recipe, "run_dir": str(run_dir.root), "dataset": splits.description,
                     "student": cfg.student.arch, "teachers": [cfg.teacher1.arch, cfg.teacher2.arch]}
    for i, name in enumerate(("teacher1", "teacher2")):
        for split in ("val", "test"):
            logits, labels = caches[split].logits[0][i], caches[split].labels
            summary[f"{name}_{split}_acc"] = 100.0 * float((logits.argmax(1) == labels).sum()) / len(labels)
        say(f"{name} {teachers[i].arch}: val {summary[f'{name}_val_acc']:.2f}%  test {summary[f'{name}_test_acc']:.2f}%")
    cache_seconds = time.perf_counter() - t0

    # The MBM (trained in stage A, frozen in stage B) and the student side.
    dims = (caches["train"].teacher1.shape[-1], caches["train"].teacher2.shape[-1])
    torch.manual_seed(cfg.seed)
    mbm_train = MBM(cfg.mbm, dims, k).to(device).train()
    mbm_eval = copy.deepcopy(mbm_train).eval()
    mbm_params = {n: p.detach() for n, p in mbm_train.named_parameters()}
    student = build_net(cfg.student, k, device, channels_last=cfg.channels_last, seed=cfg.seed)
    student_shapes = feature_shapes(student.eval_skeleton)
    projection = ProjectionHead(student_shapes["pooled"][1], cfg.mbm.z_dim).to(device).train()
    params = {"student": student.params, "projection": {n: p.detach() for n, p in projection.named_parameters()}}
    buffers = {"student": student.buffers, "projection": {n: b.detach() for n, b in projection.named_buffers()}}
    adapters = None
    if cfg.stage_b.gamma > 0:
        s = cfg.stage_b.feature_stage
        if s not in student_shapes:
            raise ConfigError(f"{cfg.student.arch} has no feature map {s!r}")
        adapters = tuple(nn.Conv2d(student_shapes[s][1], feature_shapes(t.eval_skeleton)[s][1], 1).to(device).train()
                         for t in teachers)
        params["adapters"] = {name: {n: p.detach() for n, p in a.named_parameters()}
                              for name, a in zip(("teacher1", "teacher2"), adapters)}
        buffers["adapters"] = {}
    frozen = {"teacher1": {"params": teachers[0].params, "buffers": teachers[0].buffers},
              "teacher2": {"params": teachers[1].params, "buffers": teachers[1].buffers}, "mbm": mbm_params}

    spe = steps_per_epoch(splits, cfg.data)
    total_steps = spe * cfg.epochs
    optimizer = build_optimizer(cfg.optim)
    parts = StageBParts(student, projection, teachers, mbm_eval, adapters, cfg.mbm.z_dim)
    step_b = compile_step(make_train_step(
        stage_b_loss(parts, cfg.stage_b, total_steps), optimizer, lr_schedule(cfg.optim, spe, cfg.epochs),
        clip_fn=stage_b_clip(cfg.grad_clip_norm_init, cfg.grad_clip_norm_final, cfg.grad_clip_warmup_frac, total_steps),
        amp=cfg.amp, device_type=device.type), cfg.compile)
    state = init_state(params, buffers, optimizer, frozen=frozen, ema=cfg.ema, amp=cfg.amp)
    meta = student.meta(cfg.student, splits.name)
    info: dict = {"epoch": 0}
    if cfg.resume and run_dir.path("last.safetensors").exists():
        state, info = load_train_state(run_dir.path("last.safetensors"), expect={"arch": student.arch}, device=device,
                                       like=state)
        say(f"resuming {run_dir.root} after student epoch {info['epoch']}")

    eval_fn = compile_step(make_eval_fn(student.eval_skeleton), cfg.compile)
    for stage, (start, end) in enumerate(stage_boundaries(cfg.epochs, cfg.num_stages)):
        if info["epoch"] >= end:
            continue  # finished before the interruption; its MBM is inside the restored state
        if info["epoch"] <= start:
            mbm_params, synergy = run_stage_a(cfg, run_dir, stage, mbm_train, mbm_eval, state["frozen"]["mbm"],
                                              caches, device)
            state = {**state, "frozen": {**state["frozen"], "mbm": mbm_params}}
            summary.update({f"stage{stage + 1}_{key}": value for key, value in synergy.items()})
            summary.update(synergy)
            info = {**info, "epoch": start}
        result = train_loop(cfg, run_dir, state=state, train_step=step_b, splits=splits, device=device, part="student",
                            eval_fn=eval_fn, weight_meta=meta, epochs=end, tag="", resume_info=info)
        state = result.state
        info = {"epoch": end, "best_val": result.best_val, "best_ema_val": result.best_ema_val,
                "train_seconds": result.train_seconds, "images_seen": result.images_seen}
        summary[f"stage{stage + 1}_student_val_acc"] = result.best_val
    accuracies = final_report(run_dir, state=state, part="student", eval_fn=eval_fn, splits=splits, cfg=cfg,
                              device=device, weight_meta=meta)
    summary.update({"num_parameters": meta["num_parameters"], "epochs": cfg.epochs, "seed": cfg.seed,
                    "wall_seconds": time.perf_counter() - t0, "cache_seconds": cache_seconds,
                    "train_seconds": info["train_seconds"], "images_per_second":
                        info["images_seen"] / max(info["train_seconds"], 1e-9), **accuracies})
    if "synergy_val_acc" not in summary:  # every stage A ran before an interruption: read the saved MBM result
        from kd.checkpoint import read_metadata
        meta_a = read_metadata(run_dir.path(f"mbm_stage{cfg.num_stages}.safetensors"))
        summary.update({"synergy_val_acc": float(meta_a["synergy_val_acc"]),
                        "synergy_test_acc": float(meta_a["synergy_test_acc"])})
    run_dir.write_summary(summary)
    say(f"\nteachers: {cfg.teacher1.arch} test {summary['teacher1_test_acc']:.2f}%, {cfg.teacher2.arch} test "
        f"{summary['teacher2_test_acc']:.2f}%; synergy test {summary['synergy_test_acc']:.2f}%")
    print_accuracy_table(summary)
    return summary


def main(argv=None, prog="launch.py recipes.ibkd"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
