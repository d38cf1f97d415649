"""Typed configuration shared by every recipe.

A recipe is a frozen dataclass instance; ``launch.py`` hands it to tyro, which turns every field
(nested ones too) into a command-line flag with its docstring as help. ``__post_init__`` only validates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .data import DataConfig
from .distributed import DistConfig, init as init_distributed, launched_by_torchrun
from .errors import ConfigError
from .optim import OptimConfig
from .step import AmpConfig


@dataclass(frozen=True)
class ModelConfig:
    """A network: architecture name and how to initialise it."""

    arch: str = "resnet8x4"
    """Architecture: a CIFAR model (resnet8x4, resnet32x4, resnet20, resnet56, wrn_16_2, wrn_40_2,
    mobilenet_v2, ...), a teacher (resnet152, efficientnet_b2) or any torchvision classifier name."""
    pretrained: bool = False
    """Start from torchvision's ImageNet weights (needs them downloaded or in torch's hub cache)."""
    small_input: bool = True
    """Adapt the stem to 32x32 inputs (ResNet: 3x3 stride-1 conv1, no maxpool; EfficientNet: stride-1 stem).
    Follows the data: images larger than 64 px (--data.image-size) always keep the ImageNet stem."""


@dataclass(frozen=True)
class LogConfig:
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = False
    """Also write TensorBoard event files beside metrics.jsonl (in run_dir/tensorboard; needs
    pip install -e '.[tensorboard]')."""


MAX_EPOCHS = 100_000  # a bound far above any real run, so that a typo is an error rather than an overflow


@dataclass(frozen=True)
class RunConfig:
    """Fields every training recipe has: data, optimizer, precision, budget and bookkeeping."""

    data: DataConfig = field(default_factory=DataConfig)
    """Dataset, split, augmentation and batching."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    amp: AmpConfig = field(default_factory=AmpConfig)
    """Mixed precision."""
    epochs: int = 90
    """Training epochs."""
    seed: int = 0
    """Seed of the split, the data order, the augmentation and the initialisation."""
    compile: bool = True
    """Compile the whole train step with torch.compile (one graph)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode of the train and eval steps: 'reduce-overhead' replays the whole step as a CUDA graph
    (CUDA only), 'max-autotune' also autotunes Inductor's kernels (longer compile)."""
    kernels: Literal["auto", "triton", "reference"] = "auto"
    """Loss kernels (AT, IB): 'auto' = the fused Triton kernels on CUDA tensors and the pure-torch
    reference elsewhere; 'triton' always (on a CPU only under TRITON_INTERPRET=1); 'reference' never.
    $KD_KERNELS, when set, overrides this field (the run's config.json records the value used)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu' or 'cuda[:i]'."""
    channels_last: bool = False
    """Keep images and conv weights in channels-last memory format."""
    disable_tqdm: bool = False
    """Hide progress bars (they also hide themselves when stdout is not a terminal)."""
    log_every: int = 50
    """Read training metrics back from the device every N steps."""
    log: LogConfig = field(default_factory=LogConfig)
    """Extra metric sinks."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Data parallelism under torchrun (see kd.distributed)."""
    out_dir: str = "runs"
    """Parent folder of run directories (runs/<recipe>-<time>/)."""
    run_name: str = ""
    """Run directory name; empty = <recipe>-<timestamp>. An existing directory is never reused (see --resume)."""
    resume: str = ""
    """Continue the run in this directory from its latest checkpoint, with its saved config: only --epochs
    (upwards), --log-every, --disable-tqdm and --log.tensorboard may be changed alongside."""

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ConfigError(f"--epochs must be in 1..{MAX_EPOCHS:,}, got {self.epochs}")
        if self.log_every < 1:
            raise ConfigError(f"--log-every must be >= 1, got {self.log_every}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in 0..2**32-1, got {self.seed}")
        if self.run_name and (self.run_name in (".", "..") or any(sep in self.run_name for sep in ("/", "\\", "\0"))):
            raise ConfigError(f"--run-name {self.run_name!r} must be a plain folder name (no '/', not '.' or '..'): "
                              f"the run directory is --out-dir/--run-name, choose the parent with --out-dir")
        # Every method's CE has a label_smoothing field (0 = one-hot targets, 1 = uniform targets: nothing to learn).
        smoothing = getattr(self, "label_smoothing", 0.0)
        if not (isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0):
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {smoothing}")


DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``; anything but the documented forms, or a GPU this machine lacks,
    is one :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_by_torchrun():  # one GPU per rank
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"unknown device {name!r}: use {DEVICE_FORMS}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available on this machine "
                              f"(use 'cpu' or 'auto')")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r} asked for, but this machine has {count} CUDA device(s): "
                              f"cuda:0..cuda:{count - 1}")
    return device


def device_label(device: torch.device) -> str:
    """What a benchmark reports as its machine: the GPU's name, or the CPU and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Rebuild a (nested, frozen) config dataclass from :func:`to_dict`'s output (a saved config.json), every
    value checked against its field's type (see :func:`_checked`); an unknown field is a :class:`ConfigError`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        head, sep, path = where.rpartition(": ")  # "--config FILE: teachers.0." -> the file, then the field path
        raise ConfigError(f"{head}{sep}unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(path + k for k in unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _checked(hints[name], value, where + name) for name, value in data.items()})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) file holding one object of config fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or give the "
                                  f"fields as JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (any parse error of a user's file is one line)
        raise ConfigError(f"--config {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}"
                          f" ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold one object of fields, e.g. {{\"epochs\": 30}}")
    return data


# Keys of a run's config.json that are not fields to start from: the recipe's name and the resumed run.
CONFIG_FILE_IGNORED = frozenset({"recipe", "resume"})


def apply_config_file(cfg: Any, path: str | Path) -> Any:
    """``cfg`` with the fields of the config file at ``path`` (any subset, nested as in config.json); an unknown
    field or a value of the wrong type is one :class:`ConfigError` naming it."""
    data = {k: v for k, v in upgrade_saved(read_config_file(path)).items() if k not in CONFIG_FILE_IGNORED}
    old = sorted(k for k in data if any(k.removesuffix("_ckpt") in names for names in RENAMED_TEACHERS))
    if old and not hasattr(cfg, old[0]):
        raise ConfigError(f"--config {path}: {', '.join(old)} {'is' if len(old) == 1 else 'are'} now part of one list, "
                          f"teachers: [{{\"arch\": ..., \"ckpt\": ...}}, ...] (a file with every teacher and its "
                          f"_ckpt is read as that list)")
    return _merge(cfg, data, f"--config {path}", "")


def _merge(cfg: Any, data: dict[str, Any], where: str, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + k for k in unknown)} for {type(cfg).__name__}")
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in data.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, where, f"{prefix}{key}.")
        else:
            changes[key] = _checked(hints[key], value, f"{where}: {prefix}{key}")
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _checked(tp: Any, value: Any, name: str) -> Any:
    """``value`` as type ``tp`` (lists become tuples, ints become floats), or a ConfigError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{name} is {value!r}, expected {getattr(tp, '__name__', str(tp))}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} is {value!r}, expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise bad
        return tuple(_checked(a, v, f"{name}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, f"{name}.")
    return value


# Recipe fields added after runs were saved without them; such a run resumes with their defaults.
ADDED_FIELDS = frozenset({"teacher_cache", "teacher_cache_max_gb"})

# Fields renamed since runs were saved: the teachers were separate fields (``teacher`` + ``teacher_ckpt``, or
# ``teacher1`` + ``teacher1_ckpt`` and ``teacher2`` + ``teacher2_ckpt``) before they became one list.
RENAMED_TEACHERS = (("teacher",), ("teacher1", "teacher2"))


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a run's config.json, a --config file) in today's field names: its separate teacher
    fields become one ``teachers`` list, in order. Anything else is returned as it is."""
    for names in RENAMED_TEACHERS:
        if "teachers" not in data and all(n in data and f"{n}_ckpt" in data for n in names):
            data = dict(data)
            teachers = []
            for n in names:
                model, ckpt = data.pop(n), data.pop(f"{n}_ckpt")
                teachers.append({**model, "ckpt": ckpt} if isinstance(model, dict) else model)
            data["teachers"] = teachers
    return data


def load_run_config(cls: type, run_dir: str | Path) -> Any:
    """The resolved config saved in ``run_dir/config.json``, rebuilt as ``cls``. A folder that is not a run
    directory, an unreadable file, or the run of another recipe is one :class:`ConfigError`."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist (is {run_dir} a run directory?)")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume: {path} is unreadable ({str(exc).splitlines()[0]})") from None
    recipe = data.pop("recipe", "?")
    data = upgrade_saved(data)
    # The recipe's own fields must match; RunConfig's fields (every recipe has them) may have grown since
    # (defaults apply), and so may the recipe fields of ADDED_FIELDS (a run saved before they existed lacks them).
    common = {f.name for f in dataclasses.fields(RunConfig)}
    own = {f.name for f in dataclasses.fields(cls)} - common
    saved_own = set(data) - common
    if saved_own != own and not (saved_own <= own and own - saved_own <= ADDED_FIELDS):
        raise ConfigError(f"cannot resume: {run_dir} is a run of recipes.{recipe}, whose config differs from this "
                          f"recipe's: resume it with python launch.py recipes.{recipe} --resume {run_dir}")
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError, ConfigError) as exc:
        raise ConfigError(f"cannot resume: {path} holds an invalid config ({str(exc).splitlines()[0]})") from None


def resolve_kernels(cfg: Any, device: torch.device) -> Any:
    """``cfg`` with its ``kernels`` field final: ``$KD_KERNELS`` overrides it; a choice that cannot run on
    ``device`` is one clear :class:`ConfigError` before any work."""
    from kernels import BACKENDS
    from kernels._dispatch import ENV_VAR, HAS_TRITON, interpreting

    choice = os.environ.get(ENV_VAR, "").strip().lower() or cfg.kernels
    if choice not in BACKENDS:
        raise ConfigError(f"${ENV_VAR}={choice!r}: must be one of {', '.join(BACKENDS)}")
    if choice == "triton":
        if not HAS_TRITON:
            raise ConfigError("--kernels triton: Triton is not installed (use --kernels auto or reference)")
        if device.type != "cuda" and not interpreting():
            raise ConfigError(f"--kernels triton on {device.type}: Triton kernels need a CUDA device, or "
                              "TRITON_INTERPRET=1 set in the environment (CPU interpreter, slow); "
                              "use --kernels auto or reference")
    return cfg if choice == cfg.kernels else dataclasses.replace(cfg, kernels=choice)


SMALL_INPUT_MAX = 64  # images up to this size get the small-input stems


def fit_models_to_images(cfg: Any) -> Any:
    """``cfg`` with every model's ``small_input`` off (a field, or a tuple of them: the teachers) when the images
    are larger than SMALL_INPUT_MAX."""
    if cfg.data.image_size <= SMALL_INPUT_MAX:
        return cfg

    def large(value: Any) -> Any:
        if isinstance(value, ModelConfig) and value.small_input:
            return dataclasses.replace(value, small_input=False)
        if isinstance(value, tuple) and any(isinstance(v, ModelConfig) for v in value):
            return tuple(large(v) for v in value)
        return value

    changes = {f.name: large(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    changes = {name: value for name, value in changes.items() if value != getattr(cfg, name)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def check_compile_mode(cfg: Any, device: torch.device) -> None:
    """A ``--compile-mode`` that cannot apply is one :class:`ConfigError` before any work."""
    if cfg.compile_mode == "default":
        return
    if not cfg.compile:
        raise ConfigError(f"--compile-mode {cfg.compile_mode} needs --compile True")
    if cfg.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"--compile-mode reduce-overhead replays CUDA graphs, which need a CUDA device (this run is "
                          f"on {device.type}): use --compile-mode default or max-autotune")


def compile_mode(cfg: Any) -> str | None:
    """The ``mode`` argument of torch.compile for this run (None = torch's default)."""
    return None if cfg.compile_mode == "default" else cfg.compile_mode


def short_warmup_warning(cfg: Any) -> str | None:
    """The one-line warning for a warm-up that outlasts the run (the learning rate never reaches its peak),
    or None. A run prints it when it starts training (see :class:`kd.rundir.Run`), not before its checks."""
    optim = getattr(cfg, "optim", None)
    if optim is None or optim.warmup_epochs <= cfg.epochs:
        return None
    return (f"warning: --optim.warmup-epochs {optim.warmup_epochs:g} is longer than the run's {cfg.epochs} epochs, so "
            f"the learning rate never reaches --optim.lr {optim.lr:g} (at most {cfg.epochs / optim.warmup_epochs:.0%} "
            f"of it); lower --optim.warmup-epochs or raise --epochs")


def setup(cfg: Any) -> tuple[Any, torch.device]:
    """Before any work: the models' stems for the image size, the device, the final kernels choice, and
    (under torchrun) joining the process group."""
    cfg = fit_models_to_images(cfg)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:  # before the process group forms: every rank refuses alike and rank 0 alone says so
        batches = {"--data.batch-size": cfg.data.batch_size}
        if hasattr(cfg, "stage_a"):
            batches["--stage-a.batch-size"] = cfg.stage_a.batch_size
        for flag, size in batches.items():
            if size % ranks:
                raise ConfigError(f"{flag} {size} is the global batch and must be divisible by the {ranks} ranks "
                                  f"of this torchrun job (e.g. {max(ranks, size // ranks * ranks)})")
    device = resolve_device(cfg.device)
    check_compile_mode(cfg, device)
    cfg = resolve_kernels(cfg, device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    init_distributed(cfg.dist, device)
    return cfg, device
