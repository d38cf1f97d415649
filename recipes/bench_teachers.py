"""Benchmark: what the frozen teachers cost in a distillation step, and the levers that cut it.

For each teacher, images/s of (a) the teacher's eval forward alone and (b) a whole Hinton-KD train step
(student forward + backward + teacher forward), with the teacher as loaded, with its BatchNorm folded
into its convolutions (``kd.teachers.fold_batchnorm``, the default of every distillation recipe),
folded + channels-last, and with the teacher's outputs shared (``kd.teacher_outputs``: a later method of a
comparison reads them instead of running the teacher; (a) is then the reading: hashing the batch's images
and taking the stored outputs); rounds interleave the variants so a busy machine slows all of them alike.

    python launch.py recipes.bench_teachers
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from kd.config import ModelConfig, device_label, resolve_device
from kd.losses import hinton_kd
from kd.modeling import Net, build_net
from kd.optim import adamw
from kd.step import apply_model, init_state, make_train_step, mixed_cross_entropy
from kd.step import frozen_teacher
from kd.teacher_outputs import TeacherOutputs
from kd.teachers import fold_batchnorm

from ._cli import parse


@dataclass(frozen=True)
class BenchTeachersConfig:
    """Teachers, student and batch to time."""

    teachers: tuple[str, ...] = ("resnet20", "wrn_16_2", "resnet32x4")
    """Teacher architectures (CIFAR models, random weights: speed does not depend on them)."""
    student: ModelConfig = ModelConfig(arch="resnet8")
    """Student of the KD step."""
    batch_size: int = 128
    """Images per step."""
    num_classes: int = 10
    """Classes."""
    steps: int = 8
    """Timed steps per round and variant."""
    rounds: int = 4
    """Interleaved rounds; the first is a warm-up, the median of the others is reported."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


CONFIG = BenchTeachersConfig()


def _channels_last(net: Net) -> Net:
    params = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in net.params.items()}
    return Net(net.arch, net.num_classes, net.train_skeleton, net.eval_skeleton, params, net.buffers)


SHARED = "BN folded + channels-last, outputs shared (read back)"


def _rounds(cfg: BenchTeachersConfig, device: torch.device, runners: dict, shared_stream) -> None:
    """Interleaved timed rounds; the first is a warm-up. The shared variant gets its batches (with the
    stored outputs) from ``shared_stream()``, which is what it costs instead of a teacher forward."""
    for r in range(cfg.rounds):
        for name, run_ in runners.items():
            net, batch = run_["net"], run_["batch"]
            t0 = time.perf_counter()
            if name == SHARED:
                list(shared_stream())  # hash each batch, take its stored outputs
            else:
                with torch.no_grad():
                    for _ in range(cfg.steps):
                        apply_model(net.eval_skeleton, net.params, net.buffers, batch["x"], train=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward = cfg.batch_size * cfg.steps / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            steps = shared_stream() if name == SHARED else (batch for _ in range(cfg.steps))
            for b in steps:
                run_["state"], _ = run_["step"](run_["state"], b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            kd_step = cfg.batch_size * cfg.steps / (time.perf_counter() - t0)
            if r:
                run_["forward"].append(forward)
                run_["kd_step"].append(kd_step)


def run(cfg: BenchTeachersConfig) -> list[dict]:
    device = resolve_device(cfg.device)
    student = build_net(cfg.student, cfg.num_classes, device, seed=0)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device)
    rows = []
    for arch in cfg.teachers:
        teacher = build_net(ModelConfig(arch=arch), cfg.num_classes, device, seed=1)
        folded = fold_batchnorm(teacher)
        variants = {"as loaded": (teacher, x), "BN folded": (folded, x),
                    "BN folded + channels-last": (_channels_last(folded), x.contiguous(memory_format=torch.channels_last))}
        shared_net, shared_x = variants["BN folded + channels-last"]
        variants[SHARED] = (shared_net, shared_x)
        runners = {}
        for name, (net, inputs) in variants.items():
            def loss_fn(params, buffers, frozen, batch, step, net=net):
                teacher_logits, _ = frozen_teacher("teacher", net, frozen, batch)  # read when the batch has it
                logits, _, new_buffers = apply_model(student.train_skeleton, params["s"], buffers["s"], batch["x"],
                                                     train=True)
                loss = 0.1 * mixed_cross_entropy(logits, batch) + 0.9 * hinton_kd(logits, teacher_logits, 4.0)
                return loss, ({"s": new_buffers}, {})

            optimizer = adamw()
            step = make_train_step(loss_fn, optimizer, lambda s: torch.tensor(1e-3, device=device),
                                   device_type=device.type)
            state = init_state({"s": student.params}, {"s": student.buffers}, optimizer,
                               frozen={"teacher": {"params": net.params, "buffers": net.buffers}}, ema=False)
            batch = {"x": inputs, "y_a": y, "y_b": y, "lam": torch.ones((), device=device)}
            runners[name] = {"net": net, "step": step, "state": state, "batch": batch, "forward": [], "kd_step": []}
        with tempfile.TemporaryDirectory() as tmp:
            shared = TeacherOutputs(tmp, {"teacher": shared_net}, {"bench": arch}, device=device)
            stream = shared.wrap(lambda epoch: (runners[SHARED]["batch"] for _ in range(cfg.steps)))
            list(stream(0))  # the first method computes and stores them; the timed rounds read them back
            _rounds(cfg, device, runners, lambda: stream(0))
            assert shared.misses == cfg.steps and shared.hits == cfg.steps * cfg.rounds * 2
        base = runners["as loaded"]
        for name, run_ in runners.items():
            row = {"teacher": arch, "variant": name, "forward": statistics.median(run_["forward"]),
                   "kd_step": statistics.median(run_["kd_step"])}
            row["forward_x"] = row["forward"] / statistics.median(base["forward"])
            row["kd_step_x"] = row["kd_step"] / statistics.median(base["kd_step"])
            rows.append(row)
    name = device_label(device)
    print(f"\n{name}, torch {torch.__version__}; student {cfg.student.arch}, batch {cfg.batch_size}, median of "
          f"{cfg.rounds - 1} rounds x {cfg.steps} steps\n")
    print("| teacher | variant | teacher forward or reading (images/s) | x | KD train step (images/s) | x |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['teacher']} | {r['variant']} | {r['forward']:.0f} | {r['forward_x']:.2f} | {r['kd_step']:.0f} | "
              f"{r['kd_step_x']:.2f} |")
    return rows


def main(argv=None, prog="launch.py recipes.bench_teachers"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
