"""Running IB-KD (SPEC 6): teachers, the stage-A feature cache, stage A and stage B through the common
train loop, multi-stage alternation, resume, and the summary. The method's math is in :mod:`kd.ibkd`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import tree as T
from .checkpoint import load_train_state, load_weights, read_metadata, save_checkpoint
from .config import compile_mode, to_dict
from .data import DataConfig, Dataset, Splits, crop_flip, eval_batches, steps_per_epoch
from .distributed import barrier, convert_sync_bn, sum_across_ranks, world
from .errors import ConfigError
from .ibkd import (IBKDConfig, StageBParts, stage_a_loss, stage_b_clip, stage_b_loss, synergy_scale_factor,
                   teacher_average)
from .mbm import MBM, ProjectionHead
from .modeling import Net, build_net
from .models import feature_shapes
from .optim import adamw, build_optimizer, lr_schedule
from .loop import final_report, train_loop, training_batches
from .rundir import Run, say
from .step import apply_model, call_stateless, compile_step, init_state, make_eval_fn, make_train_step
from .supervised import constant, prepare, print_accuracy_table, resolve_resume
from .teacher_outputs import teacher_outputs_for
from .teachers import TEACHER_HASHES, ensure_teacher, load_teacher, teacher_hashes

# ----------------------------------------------------------------------------------------------
# Teacher features, computed once (the teachers are frozen)


def teacher_outputs(teachers: tuple[Net, Net], x: Tensor) -> tuple[list[Tensor], list[Tensor], list[dict[str, Tensor]]]:
    """Both frozen teachers in eval mode: ``(logits, pooled, features)`` lists."""
    logits, pooled, features = [], [], []
    with torch.no_grad():
        for teacher in teachers:
            out, feats, _ = apply_model(teacher.eval_skeleton, teacher.params, teacher.buffers, x, train=False)
            logits.append(out)
            pooled.append(feats["pooled"])
            features.append(feats)
    return logits, pooled, features


def augmented_view(data: Dataset, view: int, seed: int) -> Dataset:
    """View 0 is the image itself; view v > 0 a seeded random crop (pad 4) + flip of every image."""
    if view == 0:
        return data
    generator = torch.Generator().manual_seed(seed * 100_003 + view)
    n = len(data.labels)
    top = torch.randint(0, 9, (n,), generator=generator)
    left = torch.randint(0, 9, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return Dataset(crop_flip(data.images, top, left, flip), data.labels)


@dataclass
class FeatureCache:
    """Pooled teacher features stacked over views: ``teacher1[v, i]`` is image i's (C1,) feature in view v;
    logits per view for teacher accuracy."""

    teacher1: Tensor  # (V, N, C1)
    teacher2: Tensor  # (V, N, C2)
    logits: list[tuple[Tensor, Tensor]]
    labels: Tensor

    @property
    def pooled(self) -> list[tuple[Tensor, Tensor]]:
        """Per view, the two teachers' (N, C) features (views into the stacked tensors)."""
        return [(self.teacher1[v], self.teacher2[v]) for v in range(self.teacher1.shape[0])]


def build_cache(teachers: tuple[Net, Net], data: Dataset, splits: Splits, data_cfg: DataConfig, *, views: int,
                seed: int, device: torch.device, channels_last: bool = False) -> FeatureCache:
    """Both teachers' pooled features and logits for every image and view. In a data-parallel job each
    rank runs the teachers on its shard and the ranks' pieces are summed into the whole cache."""
    rank, size = world().rank, world().size
    n = len(data.labels)
    widths = [feature_shapes(t.eval_skeleton)["pooled"][1] for t in teachers]
    classes = splits.num_classes
    pooled1 = torch.zeros(views, n, widths[0], device=device)  # (V, N, C1)
    pooled2 = torch.zeros(views, n, widths[1], device=device)  # (V, N, C2)
    logits = torch.zeros(views, 2, n, classes, device=device)
    for view in range(views):
        for batch in eval_batches(augmented_view(data, view, seed), splits, data_cfg, device=device, rank=rank,
                                  world_size=size):
            x = batch["x"].contiguous(memory_format=torch.channels_last) if channels_last else batch["x"]
            out_logits, out_pooled, _ = teacher_outputs(teachers, x)
            index = batch["index"].to(device)
            pooled1[view, index], pooled2[view, index] = out_pooled[0].float(), out_pooled[1].float()
            logits[view, 0, index], logits[view, 1, index] = out_logits[0].float(), out_logits[1].float()
    pooled1, pooled2, logits = (sum_across_ranks(t) for t in (pooled1, pooled2, logits))
    return FeatureCache(pooled1, pooled2, [(logits[v, 0], logits[v, 1]) for v in range(views)],
                        data.labels.to(device))


def cached_batches(cache: FeatureCache, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                   world_size: int = 1):
    """Shuffled stage-A batches; each image's view is drawn per epoch (seeded). With ``world_size`` > 1,
    rank ``rank``'s contiguous ``batch_size / world_size`` shard of every global batch."""
    if batch_size % world_size:
        raise ConfigError(f"stage_a.batch_size={batch_size} is not divisible by the {world_size} ranks")
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    n = len(cache.labels)
    order = torch.randperm(n, generator=generator)
    views = torch.randint(0, cache.teacher1.shape[0], (n,), generator=generator)
    device = cache.labels.device
    shard = batch_size // world_size
    for start in range(0, n - batch_size + 1, batch_size):
        start += rank * shard
        index = order[start:start + shard].to(device)
        view = views[start:start + shard].to(device)
        y = cache.labels[index]
        yield {"f1": cache.teacher1[view, index], "f2": cache.teacher2[view, index], "y_a": y, "y_b": y,
               "lam": torch.ones((), device=device)}


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).sum()) / max(1, len(labels))


def synergy_logits(mbm_eval: MBM, params: T.Tree, cache: FeatureCache) -> Tensor:
    """The MBM's synergy logits (eval mode) on view 0 of a cache."""
    with torch.no_grad():
        return call_stateless(mbm_eval, params, {}, *cache.pooled[0], train=False)[0]["logits"]


def synergy_accuracy(mbm_eval: MBM | None, params: T.Tree, cache: FeatureCache) -> float:
    """Accuracy of the synergy logits (the MBM in eval mode, or the teachers' average) on view 0."""
    with torch.no_grad():
        if mbm_eval is None:
            logits = teacher_average(cache.logits[0])
        else:
            logits = synergy_logits(mbm_eval, params, cache)
    return accuracy(logits, cache.labels)


# ----------------------------------------------------------------------------------------------
# Stage A: the MBM on cached features, through the common train loop


def stage_boundaries(epochs: int, stages: int) -> list[tuple[int, int]]:
    """Student epochs split across stages (the remainder goes to the last stages)."""
    base, extra = divmod(epochs, stages)
    bounds, start = [], 0
    for k in range(stages):
        end = start + base + (1 if k >= stages - extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def train_stage_a(cfg: IBKDConfig, run: Run, stage: int, mbm_train: MBM, mbm_eval: MBM, mbm_params: T.Tree,
                  caches: dict[str, FeatureCache], splits: Splits, device: torch.device
                  ) -> tuple[T.Tree, dict[str, float]]:
    """Train the MBM; keep the best-by-validation synergy accuracy. Deterministic, so a resumed run
    redoes an interrupted stage A identically."""
    torch.manual_seed(cfg.seed * 1000 + stage)
    a, tag = cfg.stage_a, f"A{stage + 1}"
    optimizer = adamw(weight_decay=a.weight_decay, decoupled=False)  # Adam with L2 decay
    lr = torch.tensor(a.lr, device=device)
    step = compile_step(make_train_step(stage_a_loss(mbm_train, a.beta), optimizer, lambda s: lr,
                                        clip_fn=constant(a.grad_clip_norm, device), device_type=device.type),
                        cfg.compile, mode=compile_mode(cfg))
    batch_size = min(a.batch_size, len(caches["train"].labels))
    result = train_loop(
        cfg, run, state=init_state({"mbm": mbm_params}, {}, optimizer, ema=False), train_step=step, splits=splits,
        device=device, part="mbm", eval_fn=None, weight_meta={"arch": f"mbm-{cfg.mbm.kind}"},
        batches=lambda epoch: cached_batches(caches["train"], batch_size, seed=cfg.seed * 1000 + stage, epoch=epoch,
                                             rank=world().rank, world_size=world().size),
        steps=len(caches["train"].labels) // batch_size, epochs=a.epochs, tag=tag,
        validate=lambda params, _buffers: synergy_accuracy(mbm_eval, params, caches["val"]))
    best = load_best(run, tag, device)
    test = synergy_accuracy(mbm_eval, best, caches["test"])
    say(f"[stage {tag}] synergy val {result.best_val:.2f}%  test {test:.2f}% (best by val)")
    if world().main:
        save_checkpoint(run.path(f"mbm_stage{stage + 1}.safetensors"), {"params": {"mbm": best}},
                        {"kind": "mbm", "arch": f"mbm-{cfg.mbm.kind}", "synergy_val_acc": result.best_val,
                         "synergy_test_acc": test, "config": to_dict(cfg)})
    barrier()
    return best, {"synergy_val_acc": result.best_val, "synergy_test_acc": test}


def load_best(run: Run, tag: str, device: torch.device) -> T.Tree:
    params, _, _ = load_weights(run.path(f"{tag}_best.safetensors"), expect={}, device=device)
    return params["mbm"]


# ----------------------------------------------------------------------------------------------
# Stage B's trainable side: student, projection head, optional feature adapters


def student_side(cfg: IBKDConfig, teachers: tuple[Net, Net], num_classes: int, device: torch.device
                 ) -> tuple[Net, nn.Module | None, tuple[nn.Module, nn.Module] | None, T.Tree, T.Tree]:
    student = build_net(cfg.student, num_classes, device, channels_last=cfg.channels_last, seed=cfg.seed, flag="--student")
    if cfg.dist.sync_bn and world().size > 1:
        convert_sync_bn(student.train_skeleton)
    shapes = feature_shapes(student.eval_skeleton)
    params, buffers = {"student": student.params}, {"student": student.buffers}
    projection = None
    if cfg.mbm.kind != "avg":
        projection = ProjectionHead(shapes["pooled"][1], cfg.mbm.z_dim).to(device).train()
        if cfg.dist.sync_bn and world().size > 1:
            convert_sync_bn(projection)
        params["projection"] = {n: p.detach() for n, p in projection.named_parameters()}
        buffers["projection"] = {n: b.detach() for n, b in projection.named_buffers()}
    adapters = None
    if cfg.stage_b.gamma > 0:
        s = cfg.stage_b.feature_stage
        if s not in shapes:
            raise ConfigError(f"{cfg.student.arch} has no feature map {s!r}")
        adapters = tuple(nn.Conv2d(shapes[s][1], feature_shapes(t.eval_skeleton)[s][1], 1).to(device).train()
                         for t in teachers)
        params["adapters"] = {name: {n: p.detach() for n, p in a.named_parameters()}
                              for name, a in zip(("teacher1", "teacher2"), adapters)}
        buffers["adapters"] = {}
    return student, projection, adapters, params, buffers


def stage_b_step(cfg: IBKDConfig, parts: StageBParts, spe: int, epochs: int, *, amp, device: torch.device,
                 compiled: bool, mode: str | None):
    """Stage B's pure train step (compiled when ``compiled``) and its optimizer: the loss of
    :func:`kd.ibkd.stage_b_loss`, the run's learning-rate schedule and the stage-B clipping schedule over
    ``spe * epochs`` steps."""
    total_steps = spe * epochs
    optimizer = build_optimizer(cfg.optim)
    step = compile_step(make_train_step(
        stage_b_loss(parts, cfg.stage_b, total_steps, backend=cfg.kernels), optimizer,
        lr_schedule(cfg.optim, spe, epochs),
        clip_fn=stage_b_clip(cfg.grad_clip_norm_init, cfg.grad_clip_norm_final, cfg.grad_clip_warmup_frac, total_steps),
        amp=amp, device_type=device.type), compiled, mode=mode)
    return step, optimizer


# ----------------------------------------------------------------------------------------------
# The whole method


def train_ibkd(cfg: IBKDConfig, recipe: str = "ibkd") -> dict:
    cfg = resolve_resume(cfg)
    ensure_teacher(cfg, cfg.teacher1, cfg.teacher1_ckpt, cfg.teacher_epochs, "--teacher1")
    ensure_teacher(cfg, cfg.teacher2, cfg.teacher2_ckpt, cfg.teacher_epochs, "--teacher2")
    cfg, device, splits, run = prepare(cfg, recipe)
    say(f"run {run.root}  |  {splits.description}  |  teachers {cfg.teacher1.arch} + {cfg.teacher2.arch}  |  "
        f"student {cfg.student.arch}  |  device {device}  |  kernels {cfg.kernels}")
    t0 = time.perf_counter()
    k = splits.num_classes
    teachers = tuple(load_teacher(m, c, k, device, channels_last=cfg.channels_last, fold_bn=cfg.fold_teacher_bn,
                                  dataset=splits.name)
                     for m, c in ((cfg.teacher1, cfg.teacher1_ckpt), (cfg.teacher2, cfg.teacher2_ckpt)))
    ckpts = {"teacher1": cfg.teacher1_ckpt, "teacher2": cfg.teacher2_ckpt}
    hashes = teacher_hashes(ckpts, run.root if cfg.resume else None)
    caches = {split: build_cache(teachers, data, splits, cfg.data, seed=cfg.seed, device=device,
                                 views=cfg.stage_a.cache_views if split == "train" else 1,
                                 channels_last=cfg.channels_last)
              for split, data in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    summary: dict = {"recipe": recipe, "method": recipe, "run_dir": str(run.root), "dataset": splits.description,
                     "student": cfg.student.arch, "teachers": [cfg.teacher1.arch, cfg.teacher2.arch],
                     "kernels": cfg.kernels}
    for i, name in enumerate(("teacher1", "teacher2")):
        for split in ("val", "test"):
            summary[f"{name}_{split}_acc"] = accuracy(caches[split].logits[0][i], caches[split].labels)
        say(f"{name} {teachers[i].arch}: val {summary[f'{name}_val_acc']:.2f}%  test {summary[f'{name}_test_acc']:.2f}%")
    cache_seconds = time.perf_counter() - t0

    # The MBM (trained in stage A, frozen in stage B) and the student side.
    dims = (caches["train"].teacher1.shape[-1], caches["train"].teacher2.shape[-1])
    torch.manual_seed(cfg.seed)
    mbm_train = mbm_eval = None
    mbm_params: T.Tree = {}
    if cfg.mbm.kind != "avg":
        mbm_train = MBM(cfg.mbm, dims, k, backend=cfg.kernels).to(device).train()
        mbm_eval = copy.deepcopy(mbm_train).eval()
        mbm_params = {n: p.detach() for n, p in mbm_train.named_parameters()}
    student, projection, adapters, params, buffers = student_side(cfg, teachers, k, device)
    frozen = {"teacher1": {"params": teachers[0].params, "buffers": teachers[0].buffers},
              "teacher2": {"params": teachers[1].params, "buffers": teachers[1].buffers}, "mbm": mbm_params}
    scale_synergy = mbm_train is not None and cfg.stage_b.synergy_scale == "teachers"
    if scale_synergy:  # set after each stage A; a resumed run restores it with the frozen MBM
        frozen["synergy_scale"] = torch.ones((), device=device)

    parts = StageBParts(student, projection, teachers, mbm_eval, adapters, cfg.mbm.z_dim)
    step_b, optimizer = stage_b_step(cfg, parts, steps_per_epoch(splits, cfg.data), cfg.epochs, amp=cfg.amp,
                                     device=device, compiled=cfg.compile, mode=compile_mode(cfg))
    state = init_state(params, buffers, optimizer, frozen=frozen, ema=cfg.ema, amp=cfg.amp)
    meta = {**student.meta(cfg.student, splits.name), "kernels": cfg.kernels, TEACHER_HASHES: hashes}
    info: dict = {"epoch": 0}
    if cfg.resume and (run.root / "last.safetensors").exists():  # .root: a refused resume changes nothing
        state, info = load_train_state(run.root / "last.safetensors", expect={"arch": student.arch}, device=device,
                                       like=state)
        say(f"resuming {run.root} after student epoch {info['epoch']}")

    eval_fn = compile_step(make_eval_fn(student.eval_skeleton), cfg.compile, mode=compile_mode(cfg))
    shared = teacher_outputs_for(cfg, {"teacher1": (teachers[0], hashes["teacher1"]),
                                       "teacher2": (teachers[1], hashes["teacher2"])},
                                 splits, device, method=recipe, maps=cfg.stage_b.gamma > 0)  # the feature term
    batches = shared.wrap(training_batches(cfg, splits, device)) if shared is not None else None
    last_val = None  # the final student epoch's validation accuracies, when this invocation trains it
    for stage, (start, end) in enumerate(stage_boundaries(cfg.epochs, cfg.num_stages)):
        if mbm_train is not None:
            if info["epoch"] <= start:  # stage A of this stage has not been followed by student epochs yet
                mbm_params, synergy = train_stage_a(cfg, run, stage, mbm_train, mbm_eval, state["frozen"]["mbm"],
                                                    caches, splits, device)
                state = {**state, "frozen": {**state["frozen"], "mbm": mbm_params}}
                if scale_synergy:
                    scale = synergy_scale_factor(synergy_logits(mbm_eval, mbm_params, caches["train"]),
                                                 caches["train"].logits[0])
                    state["frozen"]["synergy_scale"] = scale.to(device)
                    say(f"[stage A{stage + 1}] synergy logits divided by {float(scale):.3f} (teachers' spread)")
            else:  # finished before an interruption: its MBM is inside the restored state, its numbers on disk
                saved = read_metadata(run.path(f"mbm_stage{stage + 1}.safetensors"))
                synergy = {key: float(saved[key]) for key in ("synergy_val_acc", "synergy_test_acc")}
        else:
            synergy = {f"synergy_{split}_acc": synergy_accuracy(None, {}, caches[split]) for split in ("val", "test")}
        if scale_synergy:
            synergy = {**synergy, "synergy_scale": float(state["frozen"]["synergy_scale"])}
        summary.update({f"stage{stage + 1}_{key}": value for key, value in synergy.items()}, **synergy)
        if info["epoch"] >= end:
            continue
        info = {**info, "epoch": max(info["epoch"], start)}
        result = train_loop(cfg, run, state=state, train_step=step_b, splits=splits, device=device, part="student",
                            eval_fn=eval_fn, weight_meta=meta, epochs=end, tag="", resume_info=info, batches=batches)
        state, last_val = result.state, result.last_val
        info = {"epoch": end, "best_val": result.best_val, "best_ema_val": result.best_ema_val,
                "train_seconds": result.train_seconds, "images_seen": result.images_seen}
        summary[f"stage{stage + 1}_student_val_acc"] = result.best_val
    accuracies = final_report(run, state=state, part="student", eval_fn=eval_fn, splits=splits, cfg=cfg,
                              device=device, weight_meta=meta, last_val=last_val)
    summary.update({"num_parameters": meta["num_parameters"], "epochs": cfg.epochs, "seed": cfg.seed,
                    "wall_seconds": time.perf_counter() - t0, "cache_seconds": cache_seconds,
                    "train_seconds": info["train_seconds"], "images_per_second":
                        info["images_seen"] / max(info["train_seconds"], 1e-9), **accuracies,
                    **(shared.report() if shared is not None else {})})
    run.write_summary(summary)
    say(f"\nteachers: {cfg.teacher1.arch} test {summary['teacher1_test_acc']:.2f}%, {cfg.teacher2.arch} test "
        f"{summary['teacher2_test_acc']:.2f}%; synergy test {summary['synergy_test_acc']:.2f}%")
    print_accuracy_table(summary)
    return summary
