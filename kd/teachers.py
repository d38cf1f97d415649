"""Teachers: fine-tuning one (SPEC 5), making sure a distillation run has its checkpoints, loading one frozen.

Fine-tuning is a kd/ function so that every distillation method (and ``recipes.teacher``) calls the
same code; ``recipes.teacher`` only exposes it on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import file_sha256, load_checkpoint, load_weights, read_metadata, save_checkpoint
from .config import ModelConfig, RunConfig, setup, to_dict
from .distributed import barrier, world
from .data import DataConfig
from .errors import CheckpointError, ConfigError, OutputError
from .modeling import Net, build_net
from .optim import OptimConfig
from .rundir import check_writable, say
from .supervised import resolve_resume


@dataclass(frozen=True)
class TeacherConfig(RunConfig):
    """Teacher fine-tuning: AdamW, warm-up + cosine, RandAugment, mixup, label smoothing, clipping."""

    teacher: ModelConfig = ModelConfig(arch="resnet152", pretrained=True)
    """The teacher network."""
    ckpt: str = "checkpoints/resnet152_ft.safetensors"
    """Where the best-by-validation teacher weights are written (safetensors)."""
    overwrite: bool = False
    """Remove an existing --ckpt and train again; without it an existing checkpoint is reused."""
    label_smoothing: float = 0.05
    """Label smoothing of the cross-entropy."""
    grad_clip_norm: float = 1.0
    """Global gradient-norm clipping threshold (0 = off)."""
    ema: bool = False
    """Also keep an EMA of the weights (reported, not written to --ckpt)."""


@dataclass(frozen=True)
class TeacherSpec(ModelConfig):
    """A frozen teacher: its network (``arch``, ...) and its fine-tuned weights (``ckpt``)."""

    ckpt: str = "checkpoints/teacher_ft.safetensors"
    """Its fine-tuned weights (safetensors, recipes.teacher's output); fine-tuned first when missing."""


# SPEC 5's teachers: a pretrained ResNet-152 and EfficientNet-B2, each fine-tuned on the run's data.
SPEC_TEACHERS = (
    TeacherSpec(arch="resnet152", pretrained=True, ckpt="checkpoints/resnet152_ft.safetensors"),
    TeacherSpec(arch="efficientnet_b2", pretrained=True, ckpt="checkpoints/efficientnet_b2_ft.safetensors"),
)


@dataclass(frozen=True)
class FrozenTeachersConfig(RunConfig):
    """What every run with frozen teachers has: the student, the teachers, fine-tuning of a missing teacher, how
    the frozen teachers run and whether their outputs are shared across runs."""

    student: ModelConfig = ModelConfig(arch="resnet8x4")
    """The student network."""
    teachers: tuple[TeacherSpec, ...] = SPEC_TEACHERS
    """The frozen teachers in order: --teachers.0.arch / --teachers.0.ckpt, --teachers.1.arch, ... (the weights
    come from ckpt; pretrained only matters for fine-tuning a missing one). How many: the recipe's default (a
    --config file may list more for the methods that take any number)."""
    teacher_epochs: int = 30
    """Fine-tuning epochs for a teacher whose checkpoint is missing."""
    fold_teacher_bn: bool = True
    """Fold the frozen teachers' BatchNorm into the convolutions before them (the same function up to float
    rounding, fewer passes per forward)."""
    teacher_cache: str = ""
    """Directory where the frozen teachers' logits and pooled features are kept per training batch, so that
    runs on the same data, seed and teachers (the methods of one comparison) compute them once and read them
    afterwards ('' = every run computes them in its step). Methods that read feature maps (at, fitnet, ibkd
    with the feature term) compute them in the step regardless."""
    teacher_cache_max_gb: float = 10.0
    """--teacher-cache stores nothing (and says so) when a run's outputs would exceed this many GB."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, spec in enumerate(self.teachers):
            if not isinstance(spec, TeacherSpec) or not spec.ckpt:
                raise ConfigError(f"--teachers.{i}.ckpt must name the teacher's fine-tuned weights (.safetensors)")


# SPEC 5: AdamW 1e-3, wd 3e-4, 30 epochs, batch 128, warm-up 5 then cosine to 0.1x, RandAugment(2, 7),
# mixup 0.2, label smoothing 0.05, clipping 1.0.
FINE_TUNING = TeacherConfig(
    data=DataConfig(name="cifar100", batch_size=128, randaugment_n=2, randaugment_m=7, mixup_alpha=0.2),
    optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=3e-4, warmup_epochs=5, min_lr_ratio=0.1),
    epochs=30,
)


def fine_tune(cfg: TeacherConfig, *, flag: str = "--teacher", ckpt_flag: str = "--ckpt") -> dict:
    """Train the teacher and write its best-by-validation weights (with metadata) to ``cfg.ckpt``;
    an existing checkpoint is reused unless ``cfg.overwrite``. ``flag`` and ``ckpt_flag`` are the command
    line's names of ``cfg.teacher`` and ``cfg.ckpt``, which errors name (a distillation run fine-tuning its
    missing teacher passes ``--teachers.0`` and ``--teachers.0.ckpt``)."""
    cfg = resolve_resume(cfg)
    ckpt = Path(cfg.ckpt)
    if ckpt.is_dir():
        raise OutputError(f"{ckpt_flag} {ckpt} is a folder: name the .safetensors file to write, e.g. "
                          f"{ckpt / 'teacher.safetensors'}")
    # Where the weights go must be writable before the fine-tuning, not after it.
    check_writable(ckpt.parent, f" (choose another {ckpt_flag})")
    if ckpt.exists() and not cfg.resume:
        if not cfg.overwrite:
            meta = load_checkpoint(ckpt)[1]  # fails clearly if the file is unusable
            say(f"teacher checkpoint {ckpt} exists (arch {meta.get('arch')}, val acc {meta.get('val_acc', '?')}): "
                f"reusing it, training skipped (pass --overwrite True to retrain)")
            return {"skipped": True, "ckpt": str(ckpt)}
        say(f"--overwrite True: removing {ckpt}")
        ckpt.unlink()
    from .methods.ce import FINE_TUNING as CE_ON_THE_TEACHER
    from .train import distill  # (kd.train loads teachers through this module)

    summary = distill(cfg, CE_ON_THE_TEACHER, "teacher", flag=flag)
    tree, meta = load_checkpoint(Path(summary["run_dir"]) / "best.safetensors")
    meta = {k: v for k, v in meta.items() if k not in ("format", "code_version")}
    meta.update({"config": to_dict(cfg), "val_acc": summary["best_val_acc"], "test_acc": summary["best_test_acc"]})
    if world().main:
        save_checkpoint(ckpt, tree, meta)
    barrier()
    say(f"teacher weights (best by validation: val {summary['best_val_acc']:.2f}%, test "
        f"{summary['best_test_acc']:.2f}%) written to {ckpt}")
    return summary


def ensure_teacher(cfg: RunConfig, spec: TeacherSpec, epochs: int, flag: str = "--teachers.0") -> None:
    """Fine-tune the teacher ``spec`` (named ``flag`` on the command line) when its checkpoint is missing (as the
    original ``run_ibkd.sh`` did). The teacher sees the same dataset, split and seed as the student, so the
    validation images stay unseen by both; SPEC 5's defaults apply otherwise."""
    setup(cfg)  # a bad --device/--kernels fails before any fine-tuning; joins a data-parallel job
    barrier()  # every rank sees the same answer to "does the checkpoint exist?"
    if Path(spec.ckpt).exists():
        return
    say(f"teacher checkpoint {spec.ckpt} is missing: fine-tuning {spec.arch} for {epochs} epochs first")
    base = FINE_TUNING
    data = dataclasses.replace(base.data, name=cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size,
                               split_seed=cfg.data.split_seed,
                               train_subset=cfg.data.train_subset, synthetic_size=cfg.data.synthetic_size,
                               synthetic_classes=cfg.data.synthetic_classes, batch_size=cfg.data.batch_size,
                               eval_batch_size=cfg.data.eval_batch_size, prefetch=cfg.data.prefetch)
    # SPEC 5 warms up for 5 of 30 epochs: keep that ratio when fewer fine-tuning epochs are asked for.
    optim = dataclasses.replace(base.optim, warmup_epochs=min(base.optim.warmup_epochs, epochs / 6))
    model = ModelConfig(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelConfig)})
    fine_tune(dataclasses.replace(
        base, teacher=model, ckpt=spec.ckpt, data=data, optim=optim, epochs=epochs, seed=cfg.seed, compile=cfg.compile,
        device=cfg.device, channels_last=cfg.channels_last, disable_tqdm=cfg.disable_tqdm, amp=cfg.amp,
        out_dir=cfg.out_dir, log_every=cfg.log_every, log=cfg.log, dist=cfg.dist, kernels=cfg.kernels,
        run_name="", resume=""), flag=flag, ckpt_flag=f"{flag}.ckpt")


def load_teacher(model: ModelConfig, ckpt: str, num_classes: int, device: torch.device, *,
                 channels_last: bool = False, fold_bn: bool = False, dataset: str | None = None,
                 flag: str = "--teacher") -> Net:
    """A frozen teacher: the skeleton from ``model`` (no download: the weights come from ``ckpt``), checked
    against the checkpoint's architecture and class count, and against ``dataset`` (the run's data) where
    the checkpoint records the data it was trained on; ``fold_bn``: see :func:`fold_batchnorm`."""
    net = build_net(dataclasses.replace(model, pretrained=False), num_classes, device, channels_last=channels_last,
                    flag=flag)
    params, buffers, meta = load_weights(ckpt, expect={"arch": model.arch, "num_classes": num_classes}, device=device)
    trained_on = meta.get("dataset")
    if dataset is not None and trained_on is not None and trained_on != dataset:
        raise CheckpointError(f"{ckpt} is a teacher fine-tuned on {trained_on}, but this run trains on {dataset}: "
                              f"fine-tune one on {dataset} (python launch.py recipes.teacher --data.name {dataset} "
                              f"--ckpt NEW.safetensors) and pass that")
    part = next(iter(params))  # a teacher checkpoint holds one part ("teacher")
    net.params, net.buffers = params[part], buffers.get(part, {})
    if channels_last:
        net.params = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                      for k, v in net.params.items()}
    missing = set(net.train_skeleton.state_dict()) - set(net.params) - set(net.buffers)
    if missing:
        raise CheckpointError(f"{ckpt} lacks {len(missing)} tensors of {model.arch} (e.g. {sorted(missing)[0]})")
    return fold_batchnorm(net, channels_last=channels_last) if fold_bn else net


TEACHER_HASHES = "teacher_sha256"  # train-state metadata: {teacher name: sha256 of its checkpoint file}


def teacher_hashes(ckpts: dict[str, str], resumed: Path | None = None) -> dict[str, str]:
    """``{teacher name: sha256}`` of the teachers' checkpoint files, recorded in a run's train state. With
    ``resumed`` (the run directory of ``--resume``), a teacher whose file changed since the run started is
    refused: the student would continue against another teacher. A state saved before the hashes were
    recorded has nothing to compare with; reading the run's files changes none of them."""
    hashes = {name: file_sha256(path) for name, path in ckpts.items()}
    last = resumed / "last.safetensors" if resumed is not None else None
    if last is None or not last.exists():
        return hashes
    stored = json.loads(read_metadata(last).get(TEACHER_HASHES, "{}"))
    for name, digest in hashes.items():
        if name in stored and stored[name] != digest:
            raise CheckpointError(f"cannot resume {last.parent}: {name}'s checkpoint {ckpts[name]} has changed since "
                                  f"the run started (sha256 {stored[name][:12]}... then, {digest[:12]}... now); put "
                                  f"the original file back, or start a new run with this teacher")
    return hashes


def fold_batchnorm(net: Net, *, channels_last: bool = False) -> Net:
    """``net`` with an eval skeleton whose BatchNorms that directly follow a convolution are folded into it:
    ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``. The same eval function up to
    float rounding, one pass less per folded layer; pre-activation BatchNorms (applied to a sum, as in wide
    ResNets) stay. Only for frozen teachers: the folded net has no train-mode skeleton of its own. A model
    that torch.fx cannot trace is returned unchanged."""
    from torch.fx.experimental.optimization import fuse

    module = copy.deepcopy(net.eval_skeleton)
    module.load_state_dict({**net.params, **net.buffers})
    try:
        folded = fuse(module)
    except Exception as exc:  # noqa: BLE001  (fx refuses some generic models: keep them as they are)
        say(f"{net.arch}: BatchNorm not folded ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
        return net
    params = {k: v.detach() for k, v in folded.named_parameters()}
    if channels_last:
        params = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in params.items()}
    buffers = {k: v.detach() for k, v in folded.named_buffers()}
    return dataclasses.replace(net, eval_skeleton=folded, params=params, buffers=buffers)
