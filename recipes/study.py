"""The distillation study: a declared per-method search on validation, then every method over seeds.

Protocol (the README's results section runs exactly this):
1. The two teachers come from their checkpoints (``recipes.teacher``; their validation curves are in
   their run directories).
2. Search, seed 0 only: every tuned method runs the first ``--trials`` entries of its grid in ``GRIDS``
   (entry 0 = the recipe's defaults); the entry with the highest best-epoch *validation* accuracy is
   chosen. Test accuracy is never read to choose anything. CE has no method hyper-parameters (1 trial).
3. Final: the chosen entry of each method for every seed in ``--seeds`` (seed 0 is the search run).
   The IB-KD ablations replace one piece of IB-KD's *chosen* config (``compare.ABLATIONS``).
4. ``recipes.report`` over the final runs: mean +- std over seeds and validation curves per method.

Run names are deterministic (``<method>-t<trial>-s<seed>``): a finished run is reused, an interrupted
one resumed, so the study can be split across processes by ``--methods`` and re-run to collect.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.errors import ConfigError
from kd.rundir import say

from . import compare, ibkd, report
from ._cli import parse

# Each method's declared grid: dotted field paths of its config -> value. Entry 0 is the default.
# IB-KD's entries: latent_norm / latent_alpha, the KD weight and temperature schedule, the feature term gamma and
# the MBM kind (0-3), then the bridging design (4-7).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "ce": [{}],
    "kd": [{}, {"alpha": 0.5}, {"alpha": 0.5, "temperature": 2.0}, {"alpha": 0.7, "temperature": 8.0}],
    "ensemble_kd": [{}, {"alpha": 0.5}, {"alpha": 0.5, "temperature": 2.0}, {"alpha": 0.7, "temperature": 8.0}],
    "dkd": [{}, {"beta": 2.0}, {"beta": 4.0, "temperature": 2.0}, {"alpha": 0.5, "beta": 1.0}],
    "at": [{}, {"beta": 100.0}, {"beta": 10.0}, {"beta": 300.0}],
    "fitnet": [{}, {"alpha_hint": 10.0}, {"alpha_hint": 1.0}, {"alpha_hint": 100.0}],
    "ibkd": [
        # defaults (validation's picks: latent sqrt / 1.0; synergy scaled to the teachers' spread; CE 0.5 +
        # KD 0.5 at T 4, no clipping)
        {},
        {"stage_b.latent_norm": "dim", "stage_b.latent_alpha": 0.8},  # SPEC 6's latent term
        # SPEC 6's KD weight and temperature schedule (CE 1, KD 0.3 -> 0.6, T 6 -> 2.5, clipping 1 -> 0)
        {"stage_b.ce_alpha": 1.0, "stage_b.kd_alpha_init": 0.3, "stage_b.kd_alpha_final": 0.6,
         "stage_b.kd_temperature_init": 6.0, "stage_b.kd_temperature_final": 2.5, "grad_clip_norm_init": 1.0},
        {"mbm.kind": "vib", "stage_b.gamma": 1.0},
        # the bridging entries: per-sample attention fusion queried by the student; with 2 / 4 stages, stage A's
        # bridging term from its second stage on (the first stage A sees an untrained student), and the per-sample
        # KD target
        {"mbm.kind": "attn"},
        {"mbm.kind": "attn", "num_stages": 2, "stage_a.student_kd": 1.0, "stage_a.student_kd_start": 20},
        {"mbm.kind": "attn", "num_stages": 4, "stage_a.student_kd": 1.0, "stage_a.student_kd_start": 20},
        {"mbm.kind": "attn", "num_stages": 2, "stage_a.student_kd": 1.0, "stage_a.student_kd_start": 20,
         "stage_b.kd_target": "auto"},
    ],
    # alpha 2 undoes the authors' division of the weighted KL by the number of teachers
    "camkd": [{}, {"alpha": 2.0}, {"alpha": 2.0, "temperature": 2.0}, {"alpha": 4.0}],
}


@dataclass(frozen=True)
class StudyConfig(compare.CompareConfig):
    """compare's config (shared data, student, teachers, budget) plus the search."""

    trials: int = 4
    """Grid entries searched per tuned method on seed 0 (the same number for every method)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the final runs at the chosen settings (seed 0 is the search run)."""
    report_name: str = "study"
    """Base name of the report files."""
    fixed: tuple[str, ...] = ()
    """'method=trial' pairs: run that grid entry without searching, e.g. ``kd=1`` when an earlier search
    (at a shorter budget, its search table being the evidence) chose it. Methods not named are searched."""
    entries: tuple[str, ...] = ()
    """'method=i,j,...' pairs: search exactly these entries of that method's grid (instead of the first
    --trials), e.g. ``ibkd=0,5,6,7``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        if 0 not in self.seeds:
            raise ConfigError("seeds must include 0 (the search seed)")
        self.fixed_trials()  # validates
        self.searched(next(iter(GRIDS)))

    def searched(self, method: str) -> list[int]:
        """The grid entries searched for ``method``: its --entries, else the first --trials."""
        for item in self.entries:
            name, sep, indices = item.partition("=")
            picked = [int(i) for i in indices.split(",") if i.isdigit()]
            if (not sep or name not in GRIDS or len(picked) != len(indices.split(","))
                    or any(i >= len(GRIDS[name]) for i in picked)):
                raise ConfigError(f"--entries {item!r}: expected method=i,j,... with a method of {sorted(GRIDS)} "
                                  f"and entry indices of its grid")
            if name == method:
                return picked
        return list(range(min(self.trials, len(GRIDS[method]))))

    def fixed_trials(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.fixed:
            method, sep, trial = item.partition("=")
            if not sep or method not in GRIDS or not trial.isdigit() or int(trial) >= len(GRIDS[method]):
                raise ConfigError(f"--fixed {item!r}: expected method=trial with a method of {sorted(GRIDS)} and "
                                 f"a trial index of its grid")
            out[method] = int(trial)
        return out


CONFIG = StudyConfig(**{f.name: getattr(compare.CONFIG, f.name) for f in dataclasses.fields(compare.CompareConfig)
                        if f.name not in ("seeds", "report_name")})


def replace_path(cfg: Any, path: str, value: Any) -> Any:
    """``dataclasses.replace`` through nested frozen dataclasses: ``replace_path(c, "stage_b.gamma", 1.0)``."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    for path, value in overrides.items():
        cfg = replace_path(cfg, path, value)
    return cfg


def run_once(cfg: StudyConfig, method: str, method_cfg: Any, name: str) -> dict:
    """Run (or reuse, or resume) one deterministic-named run; returns its summary."""
    run_dir = Path(cfg.out_dir) / name
    if (run_dir / "summary.json").is_file():
        say(f"--- {name}: finished earlier, reused")
        return json.loads((run_dir / "summary.json").read_text())
    say(f"\n=== {name} ===")
    module = ibkd if method in compare.ABLATIONS else compare.METHODS[method]
    method_cfg = dataclasses.replace(method_cfg, run_name=name)
    if run_dir.is_dir():  # interrupted: continue it exactly (its saved config is this config)
        method_cfg = dataclasses.replace(method_cfg, resume=str(run_dir))
    return module.run(method_cfg, recipe=method)


def trial_config(cfg: StudyConfig, method: str, trial: int, single) -> Any:
    """Grid entry ``trial`` of ``method`` applied to its seed-0 config."""
    return with_overrides(compare.method_config(cfg, method, 0, single), GRIDS[method][trial])


def overrides_text(method: str, trial: int) -> str:
    return ", ".join(f"{k}={v}" for k, v in GRIDS[method][trial].items()) or "(defaults)"


def chosen_trial(cfg: StudyConfig, method: str, single) -> tuple[int, Any, list[tuple[int, float]]]:
    """Search on seed 0; returns (trial index, its config, [(trial, best val acc)])."""
    scores = []
    for trial in cfg.searched(method):
        summary = run_once(cfg, method, trial_config(cfg, method, trial, single), f"{method}-t{trial}-s0")
        scores.append((trial, float(summary["best_val_acc"])))
    best = max(scores, key=lambda s: (s[1], -s[0]))[0]  # ties: the earlier (simpler) entry
    return best, trial_config(cfg, method, best, single), scores


def run(cfg: StudyConfig) -> list[dict]:
    needs_single = any(m in compare.SINGLE_TEACHER for m in cfg.methods)
    single = compare.pick_single_teacher(cfg) if needs_single else None
    final_dirs, selection = [], []
    chosen: dict[str, tuple[int, Any]] = {}
    fixed = cfg.fixed_trials()
    for method in [m for m in cfg.methods if m not in compare.ABLATIONS]:
        if method in fixed:
            trial, scores = fixed[method], []
            method_cfg = trial_config(cfg, method, trial, single)
        else:
            trial, method_cfg, scores = chosen_trial(cfg, method, single)
        chosen[method] = (trial, method_cfg)
        selection.append((method, scores, trial))
        for seed in cfg.seeds:
            name = f"{method}-t{trial}-s{seed}"
            run_once(cfg, method, dataclasses.replace(method_cfg, seed=seed), name)
            final_dirs.append(str(Path(cfg.out_dir) / name))
    ablations = [m for m in cfg.methods if m in compare.ABLATIONS]
    if ablations:
        base_trial, base = chosen.get("ibkd") or chosen_trial(cfg, "ibkd", single)[:2]
        variants = {method: compare.ablate(cfg, method, base) for method in ablations}  # a no-op fails before any run
        for method, variant in variants.items():
            for seed in cfg.seeds:
                name = f"{method}-t{base_trial}-s{seed}"
                run_once(cfg, method, dataclasses.replace(variant, seed=seed), name)
                final_dirs.append(str(Path(cfg.out_dir) / name))
    write_selection(cfg, selection)
    say("")
    return report.run(report.ReportConfig(runs=tuple(final_dirs), out=cfg.report_dir, name=cfg.report_name))


def write_selection(cfg: StudyConfig, selection: list[tuple[str, list[tuple[int, float]], int]]) -> None:
    """The search table: every trial's overrides and best validation accuracy, the chosen one marked."""
    lines = ["| method | trial | overrides | best val acc (%, seed 0) | chosen |", "|---|---|---|---|---|"]
    for method, scores, best in selection:
        if not scores:
            lines.append(f"| {method} | {best} | {overrides_text(method, best)} | (fixed: --fixed {method}={best}) | yes |")
        for trial, val in scores:
            lines.append(f"| {method} | {trial} | {overrides_text(method, trial)} | {val:.2f} | "
                         f"{'yes' if trial == best else ''} |")
    out = Path(cfg.report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.report_name}_search.md").write_text("\n".join(lines) + "\n")
    say("\n".join(lines))


def main(argv=None, prog="launch.py recipes.study"):
    run(parse(CONFIG, argv, prog=prog, description=__doc__))
    return 0
