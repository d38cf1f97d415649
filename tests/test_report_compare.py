"""recipes.compare (the stronger single teacher, the new methods, the IB-KD ablations recorded under their
own names) and recipes.report (mean ± std over seeds, a mean-with-band plot per method)."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd.checkpoint import read_metadata, save_checkpoint
from kd.errors import ConfigError
from recipes import compare, report

ROOT = Path(__file__).resolve().parents[1]


def fake_teacher_ckpt(path: Path, val_acc=None) -> str:
    meta = {"kind": "weights", "arch": "resnet8", "num_classes": 10}
    if val_acc is not None:
        meta["val_acc"] = val_acc
    save_checkpoint(path, {"params": {"teacher": {"w": torch.zeros(1)}}}, meta)
    return str(path)


def compare_config(ckpts=None, **changes) -> compare.CompareConfig:
    """compare's defaults; ``ckpts``: the teachers' checkpoint files instead of the defaults'."""
    cfg = dataclasses.replace(compare.CONFIG, **changes)
    if ckpts is not None:
        cfg = dataclasses.replace(cfg, teachers=tuple(dataclasses.replace(spec, ckpt=ckpt)
                                                      for spec, ckpt in zip(cfg.teachers, ckpts)))
    return cfg


@pytest.mark.parametrize("acc1,acc2,picked", [(40.0, 55.5, 1), (61.0, 55.5, 0), (50.0, 50.0, 0)])
def test_stronger_single_teacher_is_picked_by_validation_accuracy(tmp_path, acc1, acc2, picked):
    cfg = compare_config((fake_teacher_ckpt(tmp_path / "t1.safetensors", acc1),
                          fake_teacher_ckpt(tmp_path / "t2.safetensors", acc2)))
    assert cfg.single_teacher == -1  # the default: the stronger
    assert compare.pick_single_teacher(cfg) == cfg.teachers[picked]
    assert cfg.teachers[0] != cfg.teachers[1]
    # an explicit choice overrides the accuracies
    assert compare.pick_single_teacher(dataclasses.replace(cfg, single_teacher=1)) == cfg.teachers[1]
    with pytest.raises(ConfigError, match="--single-teacher must be -1"):
        dataclasses.replace(cfg, single_teacher=2)


def test_stronger_without_recorded_accuracy_is_a_clear_error(tmp_path):
    cfg = compare_config((fake_teacher_ckpt(tmp_path / "t1.safetensors", 40.0),
                          fake_teacher_ckpt(tmp_path / "t2.safetensors")))
    with pytest.raises(ConfigError, match="val_acc"):
        compare.pick_single_teacher(cfg)


def changed_fields(a, b, prefix="") -> set[str]:
    """Dotted names of the leaf fields that differ between two dataclass instances."""
    out = set()
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out |= changed_fields(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.add(prefix + f.name)
    return out


@pytest.mark.parametrize("method,field,value", [("ibkd_nolatent", "stage_b.latent_alpha", 0.0),
                                                ("ibkd_vib", "mbm.kind", "vib"),
                                                ("ibkd_feat", "stage_b.gamma", 2.5),
                                                ("ibkd_avg", "mbm.kind", "avg")])
def test_ablation_is_ibkd_with_one_field_replaced(method, field, value):
    cfg = compare_config(ablation_gamma=2.5, seeds=(7,))
    base = compare.method_config(cfg, "ibkd", 7, None)
    variant = compare.method_config(cfg, method, 7, None)
    assert type(variant) is type(base)
    assert changed_fields(base, variant) == {field}
    part, name = field.split(".")
    assert getattr(getattr(variant, part), name) == value


@pytest.mark.parametrize("method,field,value", [("ibkd_gate", "mbm.kind", "gate"),
                                                ("ibkd_nofeat", "stage_b.gamma", 0.0)])
def test_counterpart_ablations_of_a_vib_config_with_the_feature_term(method, field, value):
    cfg = compare_config(mbm=dataclasses.replace(compare.CONFIG.mbm, kind="vib"),
                         stage_b=dataclasses.replace(compare.CONFIG.stage_b, gamma=1.0), seeds=(3,))
    base = compare.method_config(cfg, "ibkd", 3, None)
    variant = compare.method_config(cfg, method, 3, None)
    assert changed_fields(base, variant) == {field}
    part, name = field.split(".")
    assert getattr(getattr(variant, part), name) == value


@pytest.mark.parametrize("method", ["ibkd_gate", "ibkd_nofeat"])
def test_an_ablation_that_changes_nothing_is_an_error(method):
    cfg = compare_config(seeds=(0,))  # the defaults: gate, no feature term
    assert (compare.CONFIG.mbm.kind, compare.CONFIG.stage_b.gamma) == ("gate", 0.0)
    with pytest.raises(ConfigError, match=f"ablation {method} leaves the compared IB-KD config unchanged"):
        compare.method_config(cfg, method, 0, None)


def test_baselines_share_data_budget_student_and_teachers():
    cfg = compare_config(epochs=3, seeds=(4,))
    single = dataclasses.replace(cfg.teachers[1], ckpt="t2.safetensors")
    dkd = compare.method_config(cfg, "dkd", 4, single)
    assert (dkd.teachers, dkd.epochs, dkd.seed, dkd.data, dkd.student) == ((single,), 3, 4, cfg.data, cfg.student)
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (1.0, 8.0, 4.0)  # the recipe's own defaults stay
    ens = compare.method_config(cfg, "ensemble_kd", 4, single)
    assert ens.teachers == cfg.teachers and len(ens.teachers) == 2
    assert set(compare.CONFIG.methods) == {"ce", "kd", "at", "fitnet", "ibkd", "dkd", "ensemble_kd", "camkd"}
    no_ema = compare_config(epochs=3, seeds=(4,), ema=False)  # --ema False reaches every method, CE included
    assert all(not compare.method_config(no_ema, m, 4, single).ema for m in ("ce", "kd", "camkd", "ibkd"))
    assert compare.method_config(cfg, "ce", 4, single).ema


def test_compare_runs_each_method_under_its_own_name(tmp_path, monkeypatch):
    """Ablations run IB-KD's code with the variant name as recipe (run-name prefix and summary method); the
    single-teacher baselines get the stronger teacher."""
    calls = []

    def fake_run(module_name):
        def run(cfg, recipe):
            calls.append((module_name, recipe, cfg))
            return {"run_dir": f"runs/{recipe}-{cfg.seed}"}
        return run

    for name, module in compare.METHODS.items():
        monkeypatch.setattr(module, "run", fake_run(name))
    monkeypatch.setattr(compare, "ensure_teacher", lambda *args: None)
    reported = []
    monkeypatch.setattr(compare.report, "run", lambda cfg: reported.append(cfg) or [])
    cfg = compare_config(methods=("dkd", "ensemble_kd", "ibkd_nolatent", "ibkd_vib"), seeds=(0, 1),
                         ckpts=(fake_teacher_ckpt(tmp_path / "t1.safetensors", 30.0),
                                fake_teacher_ckpt(tmp_path / "t2.safetensors", 60.0)))
    compare.run(cfg)
    assert [(m, r, c.seed) for m, r, c in calls] == [
        ("dkd", "dkd", 0), ("ensemble_kd", "ensemble_kd", 0), ("ibkd", "ibkd_nolatent", 0), ("ibkd", "ibkd_vib", 0),
        ("dkd", "dkd", 1), ("ensemble_kd", "ensemble_kd", 1), ("ibkd", "ibkd_nolatent", 1), ("ibkd", "ibkd_vib", 1)]
    assert calls[0][2].teachers == (cfg.teachers[1],)  # the stronger one
    assert calls[2][2].stage_b.latent_alpha == 0.0 and calls[3][2].mbm.kind == "vib"
    assert reported[0].runs[:4] == ("runs/dkd-0", "runs/ensemble_kd-0", "runs/ibkd_nolatent-0", "runs/ibkd_vib-0")


def test_compare_cli_stronger_teacher_and_ablation_names(tmp_path):
    """Through the CLI: the teachers are fine-tuned (tiny), the single-teacher baseline reads their recorded
    val_acc, and the ablation's run directory and summary carry its variant name."""
    tiny = ["--data.name", "synthetic", "--data.synthetic-size", "120", "--data.val-size", "40",
            "--data.batch-size", "16", "--data.eval-batch-size", "64", "--epochs", "1", "--compile", "False",
            "--log-every", "1", "--disable-tqdm", "True", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KD_KERNELS": "reference"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "recipes.compare", *tiny, "--methods", "dkd", "ibkd_nolatent",
         "--seeds", "0", "--student.arch", "resnet8", "--teachers.0.arch", "resnet8", "--teachers.0.pretrained", "False",
         "--teachers.0.ckpt", "ck/t1.safetensors", "--teachers.1.arch", "wrn_16_1", "--teachers.1.pretrained", "False",
         "--teachers.1.ckpt", "ck/t2.safetensors", "--teacher-epochs", "1", "--stage-a.epochs", "1",
         "--stage-a.batch-size", "16", "--mbm.z-dim", "16", "--out-dir", "runs", "--report-dir", "rep"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    accs = {name: float(read_metadata(tmp_path / "ck" / f"{name}.safetensors")["val_acc"]) for name in ("t1", "t2")}
    stronger = "resnet8" if accs["t1"] >= accs["t2"] else "wrn_16_1"
    assert f"distil from the stronger teacher: --teachers.{0 if stronger == 'resnet8' else 1} {stronger}" in proc.stdout
    runs = {d.name.split("-")[0]: d for d in (tmp_path / "runs").iterdir() if d.name.startswith(("dkd-", "ibkd"))}
    assert set(runs) == {"dkd", "ibkd_nolatent"}
    summaries = {k: json.loads((d / "summary.json").read_text()) for k, d in runs.items()}
    assert summaries["dkd"]["teachers"] == [stronger]
    assert summaries["ibkd_nolatent"]["method"] == "ibkd_nolatent"
    assert json.loads((runs["ibkd_nolatent"] / "config.json").read_text())["stage_b"]["latent_alpha"] == 0.0
    assert "| ibkd_nolatent |" in (tmp_path / "rep" / "compare.md").read_text()


# ----------------------------------------------------------------------------------------------
# report


def fake_run(root: Path, name: str, method: str, seed: int, test_best: float, val_curve: list[float],
             config: dict | None = None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    summary = {"method": method, "recipe": method, "teachers": ["resnet8"], "student": "resnet8", "seed": seed,
               "epochs": len(val_curve), "last_val_acc": val_curve[-1], "last_test_acc": test_best - 1.0,
               "best_val_acc": max(val_curve), "best_test_acc": test_best, "ema_best_test_acc": test_best + 0.5,
               "wall_seconds": 1.0, "images_per_second": 10.0, "dataset": "synthetic (procedural); tiny"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [json.dumps({"kind": "step", "epoch": 1, "loss": 1.0})]
    lines += [json.dumps({"kind": "epoch", "epoch": e + 1, "val_acc": v}) for e, v in enumerate(val_curve)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_report_two_seeds_mean_std_table_and_banded_plot(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    fake_run(runs, "dkd-a", "dkd", 0, 50.0, [10.0, 30.0, 40.0])
    fake_run(runs, "dkd-b", "dkd", 1, 54.0, [20.0, 40.0, 44.0])
    fake_run(runs, "ce-a", "ce", 0, 61.0, [15.0, 25.0, 35.0])

    import matplotlib.figure
    figures = []
    savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k))[1])
    out = tmp_path / "rep"
    rows = report.run(report.ReportConfig(runs=(str(runs),), out=str(out), name="cmp"))
    assert len(rows) == 3

    table = (out / "cmp.md").read_text()
    # sample std of (50, 54) = 2.83; of the EMA (50.5, 54.5) too; val best (40, 44)
    assert "| synthetic | dkd | - | resnet8 | resnet8 | 3 | 2 | 42.00 ± 2.83 | 52.00 ± 2.83 | 51.00 ± 2.83 | 52.50 ± 2.83 |" in table
    assert "| synthetic | ce | - | resnet8 | resnet8 | 3 | 1 | 35.00 | 61.00 | 60.00 | 61.50 |" in table
    with open(out / "cmp.csv") as f:
        assert len(list(csv.DictReader(f))) == 3  # per run, as before
    with open(out / "cmp_methods.csv") as f:
        per_method = {r["method"]: r for r in csv.DictReader(f)}
    assert float(per_method["dkd"]["test_acc_best_mean"]) == 52.0
    assert float(per_method["dkd"]["test_acc_best_std"]) == pytest.approx(2.8284, abs=1e-3)
    assert (out / "cmp.png").stat().st_size > 1000

    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"dkd resnet8, 3 epochs (mean of 2 seeds)", "ce resnet8, 3 epochs (1 seed)"}  # one line per method
    assert list(lines["dkd resnet8, 3 epochs (mean of 2 seeds)"].get_ydata()) == [15.0, 35.0, 42.0]
    assert len(ax.collections) == 1  # the min..max band of the two-seed method
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 10.0 and band.max() == 44.0
    assert "min..max" in ax.get_title()


def test_report_keeps_grid_entries_of_one_method_apart(tmp_path):
    """Two entries of one method (a search) are two groups, each labelled by the fields in which they differ;
    the seed, the run's name and where it wrote are not a setting, so an entry's seeds stay one group."""
    runs = tmp_path / "runs"
    for name, seed, alpha, test in (("kd-t0-s0", 0, 0.9, 50.0), ("kd-t0-s1", 1, 0.9, 54.0), ("kd-t2-s0", 0, 0.5, 60.0)):
        config = {"seed": seed, "run_name": name, "out_dir": f"runs_{seed}", "alpha": alpha,
                  "optim": {"lr": 0.1, "name": "sgd"}, "data": {"root": f"/data{seed}", "name": "synthetic"}}
        fake_run(runs, name, "kd", seed, test, [10.0, 30.0, 40.0], config)
    rows = report.run(report.ReportConfig(runs=(str(runs),), out=str(tmp_path / "rep"), name="search"))
    assert [r["setting"] for r in rows] == ["alpha=0.9", "alpha=0.9", "alpha=0.5"]
    table = (tmp_path / "rep" / "search.md").read_text()
    assert "| synthetic | kd | alpha=0.9 | resnet8 | resnet8 | 3 | 2 | 40.00 ± 0.00 | 52.00 ± 2.83 |" in table
    assert "| synthetic | kd | alpha=0.5 | resnet8 | resnet8 | 3 | 1 | 40.00 | 60.00 |" in table


def test_mean_curve_over_runs_of_different_length():
    epochs, avg, low, high = report.mean_curve([[(1, 10.0), (2, 20.0)], [(1, 30.0)]])
    assert (epochs, avg, low, high) == ([1, 2], [20.0, 20.0], [10.0, 20.0], [30.0, 20.0])


def test_teachers_outputs_are_shared_on_a_cpu_and_only_when_asked_on_a_gpu(monkeypatch):
    import torch

    cfg = dataclasses.replace(compare.CONFIG, device="cpu", out_dir="runs_x")
    assert compare.shared_outputs(cfg) == str(Path("runs_x") / "teacher_outputs")
    assert compare.method_config(cfg, "ibkd", 0, None).teacher_cache == compare.shared_outputs(cfg)
    assert compare.shared_outputs(dataclasses.replace(cfg, teacher_cache="tc")) == "tc"
    assert compare.shared_outputs(dataclasses.replace(cfg, share_teachers=False, teacher_cache="tc")) == ""
    monkeypatch.setattr(compare, "resolve_device", lambda name: torch.device("cuda"))
    assert compare.shared_outputs(cfg) == ""  # the teachers' forward is cheaper than reading on a GPU
    assert compare.shared_outputs(dataclasses.replace(cfg, teacher_cache="tc")) == "tc"
