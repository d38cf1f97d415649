"""Smoke of the default IB-KD pipeline: a few steps of each part, images/s, the full CIFAR-100 run's projected time.

The default pipeline's own pieces, each limited to ``--warmup`` + ``--steps`` steps: fine-tuning teacher 1
(resnet152) and teacher 2 (efficientnet_b2) with SPEC 5's step (``kd.teachers.FINE_TUNING``: AdamW, mixup,
RandAugment, label smoothing, clipping), their evaluation forward, the stage-A feature cache
(``kd.stage_a.build_cache``), stage A (the MBM on cached features) and stage B (student resnet8x4 from the frozen,
BN-folded teachers and MBM, ``kd.methods.ibkd.stage_b_loss``), and the student's evaluation forward. Weights start from
scratch (``pretrained False``: no download) and the data is the synthetic set shaped like CIFAR-100 (100 classes,
32x32), batched by the real training pipeline (augmentation and mixing included). On CUDA the steps run in bf16
autocast and compiled (``--amp``/``--compile`` 'auto'), as a GPU run would.

From the measured rates it projects the wall time of the full CIFAR-100 run (SPEC: 45,000 training images after
a 5,000-image validation split, 10,000 test images; teachers 30 epochs each, stage A 20 epochs on cached features,
stage B 90 epochs; validation every epoch, the student's with its EMA too) and writes a Markdown table to
``--out``/smoke_pipeline.md after every part, so a run stopped by a timeout still leaves the parts it finished.

    python launch.py recipes.smoke_pipeline --out results/                     # on a GPU
    python launch.py recipes.smoke_pipeline --teachers.0.arch resnet8 --teachers.1.arch resnet8 \\
        --student.arch resnet8 --steps 2 --warmup 1 --data.batch-size 8 --stage-a-batch-size 16 \\
        --data.eval-batch-size 16 --device cpu --out /tmp/smoke                  # a CPU smoke
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from kd import tree as T
from kd.config import ModelConfig, device_label, resolve_device, resolve_kernels
from kd.data import DataConfig, Dataset, eval_batches, load_splits, train_batches
from kd.errors import ConfigError
from kd.methods.ibkd import METHOD as IBKD, IBKDConfig, stage_a_loss, synergy_scale_factor
from kd.stage_a import build_cache, cached_batches
from kd.train import build_step
from kd.methods.base import STUDENT_DATA, STUDENT_OPTIM
from kd.methods.ce import FINE_TUNING as CE_ON_THE_TEACHER
from kd.modeling import build_net
from kd.optim import adamw, build_optimizer, lr_schedule
from kd.step import AmpConfig, compile_step, init_state, make_eval_fn, make_train_step
from kd.supervised import constant
from kd.teachers import FINE_TUNING, fold_batchnorm

from ._cli import parse


@dataclass(frozen=True)
class SmokePipelineConfig:
    """The default IB-KD pipeline, a few steps per part."""

    teachers: tuple[ModelConfig, ModelConfig] = (ModelConfig(arch="resnet152", pretrained=False),
                                                 ModelConfig(arch="efficientnet_b2", pretrained=False))
    """The two teachers, --teachers.0.arch and --teachers.1.arch (from scratch: no download)."""
    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """Student."""
    data: DataConfig = field(default_factory=lambda: DataConfig(
        name="synthetic", synthetic_classes=100, synthetic_size=512, val_size=64, batch_size=128))
    """Images (default: the synthetic set with CIFAR-100's 100 classes and 32x32 size) and the training batch of
    the teachers' fine-tuning and of stage B (IB-KD's 128); each part keeps its own augmentation. A synthetic set
    smaller than the steps need is enlarged (--data.synthetic-size is a minimum)."""
    stage_a_batch_size: int = 256
    """Stage A (MBM) batch size."""
    steps: int = 10
    """Timed steps (batches) per part."""
    warmup: int = 3
    """Untimed steps first in each part (compilation happens here)."""
    amp: Literal["auto", "none", "bf16"] = "auto"
    """Autocast of the train steps: 'auto' = bf16 on CUDA, none elsewhere."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the steps: 'auto' = on CUDA only."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode when compiling ('reduce-overhead': CUDA graphs, CUDA only)."""
    kernels: Literal["auto", "triton", "reference"] = "auto"
    """Loss kernels ($KD_KERNELS overrides, as in the recipes)."""
    fold_teacher_bn: bool = True
    """Fold the frozen teachers' BatchNorm (the IB-KD default) for the cache and stage B."""
    channels_last: bool = False
    """Channels-last images and weights (the recipes' default is off)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    seed: int = 0
    """Seed of the weights and the data order."""
    train_images: int = 45_000
    """Projection: training images per epoch (CIFAR-100's 50,000 less the validation split)."""
    val_images: int = 5_000
    """Projection: validation images, evaluated every epoch."""
    test_images: int = 10_000
    """Projection: test images, evaluated once per trained network (and cached for stage A)."""
    teacher_epochs: int = 30
    """Projection: fine-tuning epochs per teacher."""
    stage_a_epochs: int = 20
    """Projection: stage A epochs."""
    stage_b_epochs: int = 90
    """Projection: stage B epochs."""
    out: str = "reports"
    """Folder for smoke_pipeline.md."""


CONFIG = SmokePipelineConfig()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycle(make: Callable[[int], Iterator[dict]]) -> Iterator[dict]:
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        yield from make(epoch)
        epoch += 1


def time_steps(step: Callable, state: dict, batches: Iterator[dict], images: int, warmup: int, steps: int,
               device: torch.device, cudagraphs: bool) -> tuple[dict, float, float]:
    """``(state, images/s, warm-up seconds)`` of ``warmup`` untimed then ``steps`` timed steps; batch building
    (the data pipeline) is inside the timing, as in a run."""
    def one() -> None:
        nonlocal state
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        state, _ = step(state, next(batches))

    seconds, warm = timed(one, warmup, steps, device)
    # A CUDA graph's outputs are overwritten by the next replay of any graph: keep copies for the later parts.
    return (T.clone(state) if cudagraphs else state), images * steps / seconds, warm


def time_eval(eval_fn: Callable, params: dict, buffers: dict, x: torch.Tensor, warmup: int, steps: int,
              device: torch.device, cudagraphs: bool) -> tuple[float, float]:
    """``(images/s, warm-up seconds)`` of the evaluation forward on one batch ``x``."""
    def one() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        eval_fn(params, buffers, x)

    seconds, warm = timed(one, warmup, steps, device)
    return x.shape[0] * steps / seconds, warm


def timed(one: Callable[[], None], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """``(seconds of steps calls, seconds of the warmup calls before them)`` of ``one``, the device synced."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        one()
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return time.perf_counter() - t0, warm


class Report:
    """The rows measured so far, written to ``out/smoke_pipeline.md`` after each part."""

    def __init__(self, cfg: SmokePipelineConfig, device: torch.device, header: str):
        self.cfg, self.device, self.header, self.rows = cfg, device, header, []
        self.path = Path(cfg.out) / "smoke_pipeline.md"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, part: str, batch: int, rate: float, warm: float, full_images: int, note: str) -> None:
        minutes = full_images / rate / 60 if rate > 0 else float("nan")
        self.rows.append({"part": part, "batch": batch, "images_per_s": rate, "warmup_s": warm,
                          "full_images": full_images, "projected_min": minutes, "note": note})
        print(f"{part:24s} batch {batch:4d}  {rate:10.1f} images/s  warm-up {warm:6.1f} s  -> {minutes:8.1f} min "
              f"for {full_images:,} images", flush=True)
        self.write()

    def lines(self, expected_parts: int) -> list[str]:
        c = self.cfg
        out = [self.header, "",
               "| part | batch | images/s | warm-up s | images in the full run | projected min | what |",
               "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            out.append(f"| {r['part']} | {r['batch']} | {r['images_per_s']:.1f} | {r['warmup_s']:.1f} | "
                       f"{r['full_images']:,} | {r['projected_min']:.1f} | {r['note']} |")
        total = sum(r["projected_min"] for r in self.rows)
        warm = sum(r["warmup_s"] for r in self.rows) / 60
        out.append("")
        done = f"{len(self.rows)} of {expected_parts} parts measured"
        if len(self.rows) == expected_parts:
            out.append(f"Projected full CIFAR-100 IB-KD run: ~{total:.0f} min (~{total / 60:.1f} h) of steps and "
                       f"evaluation at the rates above, plus ~{warm:.1f} min of warm-up/compilation as measured here "
                       f"({c.teacher_epochs} teacher epochs each, {c.stage_a_epochs} stage-A epochs, "
                       f"{c.stage_b_epochs} stage-B epochs; {c.train_images:,} train / {c.val_images:,} val / "
                       f"{c.test_images:,} test images). Not included: process start, dataset loading, checkpoint "
                       f"writes. Rates of {c.steps} steps of untrained weights on synthetic data.")
        else:
            out.append(f"Incomplete ({done}): the parts measured so far project ~{total:.0f} min; no total.")
        return out

    def write(self, expected_parts: int = 8) -> None:
        self.path.write_text("\n".join(self.lines(expected_parts)) + "\n")


def _amp(cfg: SmokePipelineConfig, device: torch.device) -> AmpConfig:
    choice = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return AmpConfig(dtype=choice)


def run(cfg: SmokePipelineConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    cfg = resolve_kernels(cfg, device)
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    cudagraphs = compiled and cfg.compile_mode == "reduce-overhead"
    if cudagraphs and device.type != "cuda":
        raise ConfigError(f"--compile-mode reduce-overhead replays CUDA graphs, which need a CUDA device (this run is "
                          f"on {device.type})")
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    amp = _amp(cfg, device)
    n, w, c = cfg.steps, cfg.warmup, cfg
    if n < 1 or w < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {n} and {w}")
    batch, eval_batch = cfg.data.batch_size, cfg.data.eval_batch_size
    need = max(batch, cfg.stage_a_batch_size) * (n + w)
    data_cfg = cfg.data
    if data_cfg.name == "synthetic" and data_cfg.synthetic_size < max(need, eval_batch):
        data_cfg = dataclasses.replace(data_cfg, synthetic_size=max(need, eval_batch))
    torch.manual_seed(cfg.seed)
    splits = load_splits(data_cfg, cfg.seed)
    k = splits.num_classes
    header = (f"{device_label(device)}, torch {torch.__version__}; {splits.description}, {len(splits.train.labels)} "
              f"training images; teachers {cfg.teachers[0].arch} + {cfg.teachers[1].arch}, student {cfg.student.arch}; "
              f"amp {amp.dtype}, compile {'on' if compiled else 'off'} ({cfg.compile_mode}), kernels {cfg.kernels}; "
              f"{n} timed steps per part after {w} warm-up steps; {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    report = Report(cfg, device, header)
    report.write()
    epoch_images = lambda b: (c.train_images // b) * b  # noqa: E731  (the last incomplete batch is dropped)

    # Teachers: SPEC 5's fine-tuning step on the run's data and batch size (as kd.teachers.ensure_teacher does).
    teacher_data = dataclasses.replace(FINE_TUNING.data, name=data_cfg.name, root=data_cfg.root,
                                       val_size=data_cfg.val_size, split_seed=data_cfg.split_seed,
                                       synthetic_size=data_cfg.synthetic_size,
                                       synthetic_classes=data_cfg.synthetic_classes, batch_size=batch,
                                       eval_batch_size=eval_batch, prefetch=data_cfg.prefetch)
    eval_x = next(iter(eval_batches(Dataset(splits.train.images[:eval_batch], splits.train.labels[:eval_batch]),
                                    splits, teacher_data, device=device)))["x"]
    if cfg.channels_last:
        eval_x = eval_x.contiguous(memory_format=torch.channels_last)
    teachers = []
    for i, model in enumerate(cfg.teachers):
        name = f"teacher{i + 1}"
        net = build_net(model, k, device, channels_last=cfg.channels_last, seed=cfg.seed + i + 1,
                        flag=f"--teachers.{i}")
        optim = dataclasses.replace(FINE_TUNING.optim, warmup_epochs=min(FINE_TUNING.optim.warmup_epochs,
                                                                        c.teacher_epochs / 6))
        optimizer = build_optimizer(optim)
        step = compile_step(make_train_step(
            CE_ON_THE_TEACHER.make_loss(FINE_TUNING, net, {}, device, 0).fn, optimizer,
            lr_schedule(optim, c.train_images // batch, c.teacher_epochs),
            clip_fn=constant(FINE_TUNING.grad_clip_norm, device), amp=amp, device_type=device.type),
            compiled, mode=mode)
        state = init_state({"teacher": net.params}, {"teacher": net.buffers}, optimizer, ema=False, amp=amp)
        batches = cycle(lambda epoch: _layout(train_batches(splits, teacher_data, seed=cfg.seed, epoch=epoch,
                                                            device=device), cfg.channels_last))
        state, rate, warm = time_steps(step, state, batches, batch, w, n, device, cudagraphs)
        batches.close()
        report.add(f"{name} fine-tuning", batch, rate, warm, c.teacher_epochs * epoch_images(batch),
                   f"{model.arch}, SPEC 5 step, {c.teacher_epochs} epochs")
        net.params, net.buffers = state["params"]["teacher"], state["buffers"]["teacher"]
        eval_fn = compile_step(make_eval_fn(net.eval_skeleton), compiled, mode=mode)
        rate, warm = time_eval(eval_fn, net.params, net.buffers, eval_x, w, n, device, cudagraphs)
        report.add(f"{name} evaluation", eval_x.shape[0], rate, warm, c.teacher_epochs * c.val_images + c.test_images,
                   "validation every epoch, test once")
        teachers.append(fold_batchnorm(net, channels_last=cfg.channels_last) if cfg.fold_teacher_bn else net)
    teachers = tuple(teachers)

    # Stage-A feature cache: both frozen teachers over every train / val / test image (one view).
    ib = IBKDConfig(student=cfg.student, data=dataclasses.replace(
        STUDENT_DATA, name=data_cfg.name, root=data_cfg.root, val_size=data_cfg.val_size,
        split_seed=data_cfg.split_seed, synthetic_size=data_cfg.synthetic_size,
        synthetic_classes=data_cfg.synthetic_classes, batch_size=batch, eval_batch_size=eval_batch,
        prefetch=data_cfg.prefetch), optim=STUDENT_OPTIM, epochs=c.stage_b_epochs, amp=amp,
        compile=compiled, compile_mode=cfg.compile_mode, kernels=cfg.kernels, device=cfg.device,
        channels_last=cfg.channels_last, seed=cfg.seed, fold_teacher_bn=cfg.fold_teacher_bn)
    cached = cfg.stage_a_batch_size * (n + w)
    subset = Dataset(splits.train.images[:cached], splits.train.labels[:cached])
    warm_subset = Dataset(splits.train.images[:eval_batch], splits.train.labels[:eval_batch])
    t0 = time.perf_counter()
    build_cache(teachers, warm_subset, splits, ib.data, views=1, seed=cfg.seed, device=device,
                channels_last=cfg.channels_last)
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = build_cache(teachers, subset, splits, ib.data, views=1, seed=cfg.seed, device=device,
                        channels_last=cfg.channels_last)
    _sync(device)
    report.add("feature cache", eval_batch, cached / (time.perf_counter() - t0), warm,
               c.train_images + c.val_images + c.test_images, "both teachers, eval forward, once")

    # Stage A: the MBM on the cached features (IB-KD's loss built as kd.train.distill builds it).
    student = build_net(ib.student, k, device, channels_last=cfg.channels_last, seed=cfg.seed, flag="--student")
    named = {"teacher1": teachers[0], "teacher2": teachers[1]}
    loss = IBKD.make_loss(dataclasses.replace(ib, kernels=cfg.kernels), student, named, device,
                          c.train_images // batch * c.stage_b_epochs)
    mbm_train = loss.stages.mbm_train
    a = ib.stage_a
    optimizer = adamw(weight_decay=a.weight_decay, decoupled=False)
    lr = torch.tensor(a.lr, device=device)
    step = compile_step(make_train_step(stage_a_loss(mbm_train, a), optimizer, lambda s: lr,
                                        clip_fn=constant(a.grad_clip_norm, device), device_type=device.type),
                        compiled, mode=mode)
    state = init_state({"mbm": {n_: p.detach() for n_, p in mbm_train.named_parameters()}}, {}, optimizer, ema=False)
    batches = cycle(lambda epoch: cached_batches(cache, cfg.stage_a_batch_size, seed=cfg.seed, epoch=epoch))
    state, rate, warm = time_steps(step, state, batches, cfg.stage_a_batch_size, w, n, device, cudagraphs)
    report.add("stage A", cfg.stage_a_batch_size, rate, warm, c.stage_a_epochs * epoch_images(cfg.stage_a_batch_size),
               f"MBM on cached features, {c.stage_a_epochs} epochs")
    mbm_params = state["params"]["mbm"]

    # Stage B: the student from the frozen teachers and the MBM stage A trained.
    frozen = {name: {"params": t.params, "buffers": t.buffers} for name, t in named.items()}
    frozen.update(loss.frozen, mbm=mbm_params)
    if "synergy_scale" in frozen:
        frozen["synergy_scale"] = synergy_scale_factor(loss.stages.synergy_logits(mbm_params, cache),
                                                       [cache.logits[0][0], cache.logits[1][0]]).to(device)
    step, optimizer = build_step(ib, loss, c.train_images // batch, c.stage_b_epochs, device)
    state = init_state({"student": student.params, **loss.params}, {"student": student.buffers, **loss.buffers},
                       optimizer, frozen=frozen, ema=ib.ema, amp=amp)
    batches = cycle(lambda epoch: _layout(train_batches(splits, ib.data, seed=cfg.seed, epoch=epoch, device=device),
                                          cfg.channels_last))
    state, rate, warm = time_steps(step, state, batches, batch, w, n, device, cudagraphs)
    batches.close()
    report.add("stage B", batch, rate, warm, c.stage_b_epochs * epoch_images(batch),
               f"student + 2 teachers + MBM in the step, {c.stage_b_epochs} epochs")
    eval_fn = compile_step(make_eval_fn(student.eval_skeleton), compiled, mode=mode)
    rate, warm = time_eval(eval_fn, state["params"]["student"], state["buffers"]["student"], eval_x, w, n, device,
                           cudagraphs)
    copies = 2 if ib.ema else 1
    report.add("student evaluation", eval_x.shape[0], rate, warm,
               copies * (c.stage_b_epochs * c.val_images + c.test_images),
               "validation every epoch and test" + (", raw and EMA" if ib.ema else ""))
    print("\n" + "\n".join(report.lines(8)), flush=True)
    return report.rows


def _layout(batches: Iterator[dict], channels_last: bool) -> Iterator[dict]:
    for b in batches:
        yield {**b, "x": b["x"].contiguous(memory_format=torch.channels_last)} if channels_last else b


def main(argv=None, prog="launch.py recipes.smoke_pipeline"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
