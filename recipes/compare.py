"""Compare methods like for like over several seeds: every method's students in one table and one plot.

Methods: ce, kd, at, fitnet, dkd, ensemble_kd, camkd, ibkd and the IB-KD ablations. Every method gets the same
data, student, budget, optimizer and augmentation; the two teachers are fine-tuned once (or reused from
their checkpoints) and shared. The single-teacher baselines (kd, at, fitnet, dkd) distil from
``--single-teacher``: by default the stronger teacher by validation accuracy. The IB-KD ablations are
IB-KD with one piece replaced (``ABLATIONS``); each run is recorded under its variant's name, so the
report groups them apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from kd.checkpoint import read_metadata
from kd.config import RunConfig, resolve_device
from kd.errors import ConfigError
from kd.methods import REGISTRY
from kd.methods.base import ONE_TEACHER
from kd.rundir import say
from kd.teachers import TeacherSpec, ensure_teacher

from . import at, camkd, ce, dkd, ensemble_kd, fitnet, ibkd, kd, report
from ._cli import parse

Method = Literal["ce", "kd", "at", "fitnet", "dkd", "ensemble_kd", "camkd", "ibkd",
                 "ibkd_nolatent", "ibkd_vib", "ibkd_gate", "ibkd_feat", "ibkd_nofeat", "ibkd_avg", "ibkd_nobridge",
                 "ibkd_onestage", "ibkd_avgtarget"]
# Every method of the registry (kd/methods/) and IB-KD, each run through its preset in recipes/.
METHODS = {"ce": ce, "kd": kd, "at": at, "fitnet": fitnet, "dkd": dkd, "ensemble_kd": ensemble_kd,
           "camkd": camkd, "ibkd": ibkd}
assert set(METHODS) == set(REGISTRY), "a method of kd.methods.REGISTRY lacks its preset here"
SINGLE_TEACHER = tuple(name for name, method in REGISTRY.items() if method.teachers == ONE_TEACHER)
MULTI_TEACHER = tuple(name for name, method in REGISTRY.items() if method.teachers[0] >= 2)

# IB-KD ablations: the compared IB-KD config with one piece replaced.
ABLATIONS: dict[str, Callable[["CompareConfig", ibkd.IBKDConfig], ibkd.IBKDConfig]] = {
    # no latent alignment: the student learns from the synergy logits and the labels only
    "ibkd_nolatent": lambda cmp, c: dataclasses.replace(c, stage_b=dataclasses.replace(c.stage_b, latent_alpha=0.0)),
    # concatenated teacher features instead of the gate
    "ibkd_vib": lambda cmp, c: dataclasses.replace(c, mbm=dataclasses.replace(c.mbm, kind="vib")),
    # the gate instead of concatenated features (for a compared config whose MBM is vib)
    "ibkd_gate": lambda cmp, c: dataclasses.replace(c, mbm=dataclasses.replace(c.mbm, kind="gate")),
    # the optional feature term switched on
    "ibkd_feat": lambda cmp, c: dataclasses.replace(
        c, stage_b=dataclasses.replace(c.stage_b, gamma=cmp.ablation_gamma)),
    # the feature term switched off (for a compared config that has it on)
    "ibkd_nofeat": lambda cmp, c: dataclasses.replace(c, stage_b=dataclasses.replace(c.stage_b, gamma=0.0)),
    # the MBM replaced by the plain average of the teachers (a stage A that does not exist sees no student)
    "ibkd_avg": lambda cmp, c: dataclasses.replace(
        c, mbm=dataclasses.replace(c.mbm, kind="avg"), stage_a=dataclasses.replace(c.stage_a, student_kd=0.0),
        stage_b=dataclasses.replace(c.stage_b, kd_target="synergy")),
    # stage A without the bridging term (it never sees the student's predictions)
    "ibkd_nobridge": lambda cmp, c: dataclasses.replace(c, stage_a=dataclasses.replace(c.stage_a, student_kd=0.0)),
    # one stage A then all student epochs (no alternation)
    "ibkd_onestage": lambda cmp, c: dataclasses.replace(c, num_stages=1),
    # stage B distils the teachers' average logits instead of the synergy (the latent term still uses the MBM)
    "ibkd_avgtarget": lambda cmp, c: dataclasses.replace(c, stage_b=dataclasses.replace(c.stage_b, kd_target="average")),
}


def ablate(cmp: "CompareConfig", method: str, base: ibkd.IBKDConfig) -> ibkd.IBKDConfig:
    """``base`` with ablation ``method`` applied; an ablation that would change nothing (``ibkd_vib`` of a config
    whose MBM is already vib) is an error, not a duplicate of the compared run under another name."""
    variant = ABLATIONS[method](cmp, base)
    if variant == base:
        raise ConfigError(f"ablation {method} leaves the compared IB-KD config unchanged (mbm.kind {base.mbm.kind}, "
                          f"stage_b.gamma {base.stage_b.gamma}, stage_b.latent_alpha {base.stage_b.latent_alpha}): "
                          f"drop it or use its counterpart ({', '.join(ABLATIONS)})")
    return variant


@dataclass(frozen=True)
class CompareConfig(ibkd.IBKDConfig):
    """IB-KD's config (its teachers, MBM and stage settings are the shared ones) plus what to compare;
    the other methods keep their recipes' method-specific defaults."""

    methods: tuple[Method, ...] = ("ce", "kd", "at", "fitnet", "ibkd", "dkd", "ensemble_kd", "camkd")
    """Methods to run. IB-KD ablations (not run by default): ibkd_nolatent (latent_alpha 0), ibkd_vib / ibkd_gate
    (mbm.kind vib / gate), ibkd_feat / ibkd_nofeat (stage_b.gamma = --ablation-gamma / 0), ibkd_avg (MBM replaced
    by the teacher average), ibkd_nobridge (stage_a.student_kd 0), ibkd_onestage (num_stages 1), ibkd_avgtarget
    (stage_b.kd_target average)."""
    seeds: tuple[int, ...] = (0, 1)
    """Run seeds (initialisation, data order, augmentation); the validation split stays data.split_seed."""
    single_teacher: int = -1
    """Index in --teachers of the single-teacher baselines' teacher (kd, at, fitnet, dkd); -1 = the one whose
    checkpoint records the higher validation accuracy (the first on a tie)."""
    ablation_gamma: float = 1.0
    """Feature-term weight stage_b.gamma of the ibkd_feat ablation."""
    report_name: str = "compare"
    """Base name of the report files (in --report-dir)."""
    report_dir: str = "reports"
    """Where the table and plot are written."""
    share_teachers: bool = True
    """Compute the frozen teachers' logits and pooled features once per seed and let every later method read
    them (``kd.teacher_outputs``; a run's summary counts its hits and misses): in --teacher-cache, or
    <out-dir>/teacher_outputs when that is '' and the device is a CPU (on a GPU the teachers' forward is
    cheaper than reading: shared there only with an explicit --teacher-cache). False: every run runs its
    teachers in its step. AT, FitNet and IB-KD with the feature term read feature maps and always run them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume:
            raise ConfigError("compare has no --resume: resume one of its runs with that method's recipe")
        if not -1 <= self.single_teacher < len(self.teachers):
            raise ConfigError(f"--single-teacher must be -1 (the stronger) or an index of --teachers "
                              f"(0..{len(self.teachers) - 1}), got {self.single_teacher}")


CONFIG = CompareConfig(**{f.name: getattr(ibkd.CONFIG, f.name) for f in dataclasses.fields(ibkd.IBKDConfig)})


def validation_accuracy(ckpt: str) -> float:
    meta = read_metadata(ckpt)
    if "val_acc" not in meta:
        raise ConfigError(f"{ckpt} records no val_acc (not written by recipes.teacher): pass --single-teacher 0 "
                          "or another index of --teachers")
    return float(meta["val_acc"])


def pick_single_teacher(cfg: CompareConfig) -> TeacherSpec:
    """The single-teacher baselines' teacher; -1 (the stronger) reads every checkpoint's val_acc."""
    if cfg.single_teacher >= 0:
        return cfg.teachers[cfg.single_teacher]
    accs = [validation_accuracy(spec.ckpt) for spec in cfg.teachers]
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    say(f"single-teacher baselines distil from the stronger teacher: --teachers.{best} {cfg.teachers[best].arch} "
        f"(val acc {', '.join(f'{spec.arch} {acc:.2f}%' for spec, acc in zip(cfg.teachers, accs))})")
    return cfg.teachers[best]


def shared_outputs(cfg: CompareConfig) -> str:
    """Where the methods of this comparison share their teachers' outputs ('' = not shared). On a GPU only
    when --teacher-cache names a directory: there hashing and reading a batch's outputs cost more than the
    teachers' forward (NVIDIA H200, recipes.bench_teachers: 0.9-1.1x per KD step)."""
    if not cfg.share_teachers:
        return ""
    if cfg.teacher_cache:
        return cfg.teacher_cache
    if resolve_device(cfg.device).type == "cuda":
        return ""
    return str(Path(cfg.out_dir) / "teacher_outputs")


def method_config(cfg: CompareConfig, method: str, seed: int, single: TeacherSpec | None):
    """The config one method runs with: IB-KD (and its ablations) from the compared IB-KD fields, the
    baselines from their recipe's defaults with the shared data, budget, student and teachers."""
    if method == "ibkd" or method in ABLATIONS:
        ibkd_fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ibkd.IBKDConfig)}
        base = ibkd.IBKDConfig(**{**ibkd_fields, "seed": seed, "run_name": "", "teacher_cache": shared_outputs(cfg)})
        return ablate(cfg, method, base) if method in ABLATIONS else base
    # ema: every method keeps (or not) an EMA of its student as the compared config says (evaluating it doubles
    # the validation cost); the other method fields keep their recipe's defaults
    overrides: dict = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)},
                       "seed": seed, "student": cfg.student, "run_name": "", "ema": cfg.ema}
    if method != "ce":
        overrides["teacher_cache"] = shared_outputs(cfg)
    if method in SINGLE_TEACHER:
        overrides.update(teachers=(single,), teacher_epochs=cfg.teacher_epochs)
    if method in MULTI_TEACHER:
        overrides.update(teachers=cfg.teachers, teacher_epochs=cfg.teacher_epochs)
    return dataclasses.replace(METHODS[method].CONFIG, **overrides)


def run(cfg: CompareConfig) -> list[dict]:
    needs_single = any(m in SINGLE_TEACHER for m in cfg.methods)
    needs_all = any(m not in ("ce", *SINGLE_TEACHER) for m in cfg.methods) or (needs_single and cfg.single_teacher < 0)
    for i, spec in enumerate(cfg.teachers):  # the missing ones are fine-tuned first, before any comparison run
        if needs_all or (needs_single and i == cfg.single_teacher):
            ensure_teacher(cfg, spec, cfg.teacher_epochs, f"--teachers.{i}")
    single = pick_single_teacher(cfg) if needs_single else None
    run_dirs = []
    for seed in cfg.seeds:
        for method in cfg.methods:
            say(f"\n=== {method}, seed {seed} ===")
            module = ibkd if method in ABLATIONS else METHODS[method]
            # the recipe name becomes the run-name prefix and the summary's method: ablations stay apart
            run_dirs.append(module.run(method_config(cfg, method, seed, single), recipe=method)["run_dir"])
    say("")
    return report.run(report.ReportConfig(runs=tuple(run_dirs), out=cfg.report_dir, name=cfg.report_name))


def main(argv=None, prog="launch.py recipes.compare"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
