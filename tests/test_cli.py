"""launch.py: recipe listing, --help, and bad input rejected with a short message and a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.name", "synthetic", "--data.synthetic-size", "64", "--data.val-size", "16", "--data.batch-size", "16",
        "--epochs", "1", "--compile", "False", "--disable-tqdm", "True", "--device", "cpu", "--log-every", "1"]


def launch(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_lists_recipes():
    proc = launch()
    assert proc.returncode == 0
    for name in ("teacher", "ce", "kd", "at", "fitnet", "ibkd", "quickstart", "report", "compare", "bench_step",
                 "kernels_bench"):
        assert f"recipes.{name} " in proc.stdout, name
    assert "recipes._cli" not in proc.stdout


def test_help_shows_every_field_with_docstring_and_default():
    proc = launch("recipes.ibkd", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--teachers.0.arch", "--stage-a.cache-views", "--stage-b.latent-norm", "--grad-clip-norm-final",
                 "--amp.grad-scaler-init-scale", "--disable-tqdm", "--mbm.kind", "--num-stages", "--resume"):
        assert flag in text, flag
    assert "(default: 1024.0)" in text and "switched off" in text


def test_unknown_field_and_wrong_type_fail_before_work(tmp_path):
    for args in (["--no-such-field", "1"], ["--epochs", "three"], ["--data.name", "imagenet"]):
        proc = launch("recipes.ce", *args, "--out-dir", str(tmp_path), cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert len((proc.stderr + proc.stdout).splitlines()) < 40
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_invalid_value_is_a_short_message(tmp_path):
    proc = launch("recipes.ce", "--epochs", "0", cwd=tmp_path)
    assert proc.returncode == 1  # a value out of range: the project's one line (tyro's exit 2 is for types)
    assert proc.stderr.strip() == "error: --epochs must be in 1..100,000, got 0" and not proc.stdout
    assert not any(tmp_path.iterdir())


def test_unknown_recipe():
    proc = launch("recipes.nope")
    assert proc.returncode == 2 and "no recipe 'recipes.nope'" in proc.stderr


def test_nan_loss_stops_with_one_line_and_keeps_work(tmp_path):
    proc = launch("recipes.ce", *TINY, "--student.arch", "resnet8", "--optim.name", "sgd", "--optim.lr", "1e30",
                  "--optim.warmup-epochs", "0", "--out-dir", str(tmp_path), "--run-name", "nan", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite loss" in lines[0] and "Traceback" not in proc.stderr
    assert "no checkpoint was written yet" in lines[0] and not list((tmp_path / "nan").glob("*.safetensors"))
    assert (tmp_path / "nan" / "config.json").is_file() and (tmp_path / "nan" / "metrics.jsonl").is_file()


def test_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    proc = launch("recipes.kd", *TINY, "--student.arch", "resnet8", "--teachers.0.arch", "resnet8",
                  "--teachers.0.pretrained", "False", "--teachers.0.ckpt", str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.safetensors" in lines[0] and "truncated or corrupt" in lines[0]


def test_config_file_reproduces_a_run_and_flags_apply_over_it(tmp_path):
    first = launch("recipes.ce", *TINY, "--student.arch", "resnet8", "--optim.warmup-epochs", "0",
                   "--out-dir", str(tmp_path), "--run-name", "a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = launch("recipes.ce", "--config", str(tmp_path / "a" / "config.json"), "--seed", "1", "--run-name", "b",
                   cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    a, b = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("a", "b"))
    assert {k for k in a if a[k] != b[k]} == {"seed", "run_name"} and b["seed"] == 1


def test_config_file_with_any_subset_of_fields_and_its_errors(tmp_path):
    from kd.config import apply_config_file
    from recipes import ce

    (tmp_path / "part.json").write_text(json.dumps({"epochs": 7, "optim": {"lr": 0.01}, "data": {"val_size": 3}}))
    cfg = apply_config_file(ce.CONFIG, tmp_path / "part.json")
    assert (cfg.epochs, cfg.optim.lr, cfg.data.val_size) == (7, 0.01, 3)
    assert cfg.optim.weight_decay == ce.CONFIG.optim.weight_decay and cfg.data.name == ce.CONFIG.data.name
    cases = {"unknown.json": ({"optim": {"lr": 0.01, "bogus": 1}}, "unknown field optim.bogus"),
             "type.json": ({"epochs": "two"}, "epochs is 'two', expected int"),
             "choice.json": ({"data": {"name": "imagenet"}}, "data.name is 'imagenet', expected one of"),
             "range.json": ({"epochs": 0}, "--epochs must be in 1..100,000"),
             "list.json": ([1, 2], "must hold one object of fields")}
    for name, (content, says) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        proc = launch("recipes.ce", "--config", str(tmp_path / name), cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: --config {tmp_path / name}"), proc.stderr
        assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (tmp_path / "bad.json").write_text("{not json")
    proc = launch("recipes.ce", "--config", str(tmp_path / "bad.json"), cwd=tmp_path)
    assert proc.returncode == 1 and "is not valid JSON" in proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # nothing ran
