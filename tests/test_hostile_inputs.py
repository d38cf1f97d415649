"""Hostile and mistaken inputs through the real CLI: each case runs ``python launch.py ...`` in an empty
directory against shared fixtures (finished runs, teacher checkpoints, corrupt files, odd folders) whose
bytes are checksummed before and after every case. A case passes only when the command ends with the
documented exit code (1 and exactly one ``error: ...`` line for a bad value or file; 2 and tyro's message
for an unknown flag or a wrong type), prints no traceback, creates nothing in its directory and leaves
every fixture byte-identical. A future change that tracebacks, writes or overwrites fails here.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--data.name", "synthetic", "--data.synthetic-size", "64", "--data.val-size", "16", "--data.batch-size",
        "16", "--compile", "False", "--disable-tqdm", "True", "--log-every", "1", "--device", "cpu",
        "--optim.warmup-epochs", "0"]
TINY = [*BASE, "--epochs", "1"]
STUDENT = ["--student.arch", "resnet8"]


def launch(*args, cwd, env_drop=()):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KD_KERNELS": "reference"}
    env = {k: v for k, v in env.items() if k not in env_drop}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder`` (folders as entries too, so a new one shows)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """The fixtures every case may read and none may change."""
    fx = tmp_path_factory.mktemp("fixtures")
    work = tmp_path_factory.mktemp("build")

    def ok(*args):
        proc = launch(*args, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]

    ok("recipes.ce", *TINY, *STUDENT, "--out-dir", fx / "runs", "--run-name", "done")
    for seed, name in ((0, "teacher_a"), (1, "teacher_b")):
        ok("recipes.teacher", *TINY, "--teacher.arch", "resnet8", "--teacher.pretrained", "False", "--seed", seed,
           "--ckpt", fx / f"{name}.safetensors", "--out-dir", work / "teacher_runs")
    # A KD run, then its teacher file replaced by another teacher (same path, other bytes).
    shutil.copy(fx / "teacher_a.safetensors", fx / "swapped_teacher.safetensors")
    ok("recipes.kd", *BASE, *STUDENT, "--epochs", "1", "--teachers.0.arch", "resnet8", "--teachers.0.pretrained", "False",
       "--teachers.0.ckpt", fx / "swapped_teacher.safetensors", "--out-dir", fx / "runs", "--run-name", "kd")
    shutil.copy(fx / "teacher_b.safetensors", fx / "swapped_teacher.safetensors")

    from kd.checkpoint import load_checkpoint, save_checkpoint
    tree, meta = load_checkpoint(fx / "teacher_a.safetensors")
    meta = {k: v for k, v in meta.items() if k not in ("format", "code_version")}
    save_checkpoint(fx / "cifar10_teacher.safetensors", tree, {**meta, "dataset": "cifar10"})

    done = fx / "runs" / "done"
    last = (done / "last.safetensors").read_bytes()
    (fx / "garbage_header.safetensors").write_bytes(b"\xff" * 8 + last[8:])
    teacher = (fx / "teacher_a.safetensors").read_bytes()
    (fx / "truncated.safetensors").write_bytes(teacher[: len(teacher) // 2])
    shutil.copytree(done, fx / "runs" / "no_last")
    (fx / "runs" / "no_last" / "last.safetensors").unlink()
    shutil.copytree(done, fx / "runs" / "garbled")
    (fx / "runs" / "garbled" / "last.safetensors").write_bytes(b"\xff" * 8 + last[8:])
    shutil.copytree(done, fx / "runs" / "bad_summary")
    (fx / "runs" / "bad_summary" / "summary.json").write_text('{"method": "ce", "best_test_acc": ')
    (fx / "runs" / "not_a_run").mkdir()

    (fx / "a_file").write_text("not a folder")
    (fx / "ckpt_folder.safetensors").mkdir()
    for split in ("train", "test"):
        (fx / "one_class" / split / "only").mkdir(parents=True)
        (fx / "one_class" / split / "only" / "x.png").write_bytes(b"\x89PNG not really")
    (fx / "report_out" / "report.png").mkdir(parents=True)
    return fx


def case_args(fx: Path) -> dict[str, tuple[list, int, list[str]]]:
    """name -> (launch arguments, exit code, fragments of the error line)."""
    done, kd_run = fx / "runs" / "done", fx / "runs" / "kd"
    ce = ["recipes.ce", *BASE, *STUDENT]
    kd = ["recipes.kd", *TINY, *STUDENT, "--teachers.0.arch", "resnet8", "--teachers.0.pretrained", "False"]
    return {
        # out-of-range values: one line, exit 1
        "epochs_zero": ([*ce, "--epochs", "0"], 1, ["--epochs", "got 0"]),
        "epochs_huge": ([*ce, "--epochs", "99999999999999999999999"], 1, ["--epochs", "1..100,000"]),
        "epochs_negative": ([*ce, "--epochs", "-5"], 1, ["--epochs"]),
        "lr_zero": ([*ce, "--epochs", "1", "--optim.lr", "0"], 1, ["--optim.lr", "> 0"]),
        "lr_nan": ([*ce, "--epochs", "1", "--optim.lr", "nan"], 1, ["--optim.lr", "finite"]),
        "lr_inf": ([*ce, "--epochs", "1", "--optim.lr", "inf"], 1, ["--optim.lr", "finite"]),
        "negative_weight_decay": ([*ce, "--epochs", "1", "--optim.weight-decay", "-1e-4"], 1, ["--optim.weight-decay"]),
        "momentum_one": ([*ce, "--epochs", "1", "--optim.name", "sgd", "--optim.momentum", "1"], 1, ["--optim.momentum"]),
        "label_smoothing_above_1": ([*ce, "--epochs", "1", "--label-smoothing", "1.5"], 1, ["--label-smoothing"]),
        "label_smoothing_negative": ([*ce, "--epochs", "1", "--label-smoothing", "-0.1"], 1, ["--label-smoothing"]),
        "image_size_huge": ([*ce, "--epochs", "1", "--data.name", "folder", "--data.root", fx / "one_class",
                             "--data.image-size", "100000"], 1, ["--data.image-size", "8..1024"]),
        "batch_size_zero": ([*ce, "--epochs", "1", "--data.batch-size", "0"], 1, ["data.batch_size"]),
        "randaugment_magnitude": ([*ce, "--epochs", "1", "--data.randaugment-m", "99"], 1, ["randaugment_m"]),
        "cutmix_prob": ([*ce, "--epochs", "1", "--data.cutmix-prob", "2"], 1, ["cutmix_prob"]),
        "one_synthetic_class": ([*ce, "--epochs", "1", "--data.synthetic-classes", "1"], 1, ["synthetic_classes"]),
        "seed_negative": ([*ce, "--epochs", "1", "--seed", "-1"], 1, ["--seed"]),
        "log_every_zero": ([*ce, "--epochs", "1", "--log-every", "0"], 1, ["--log-every"]),
        # run directories stay inside --out-dir
        "run_name_escapes": ([*ce, "--epochs", "1", "--run-name", "../../escaped"], 1, ["--run-name", "plain folder"]),
        "run_name_absolute": ([*ce, "--epochs", "1", "--run-name", fx / "absolute_run"], 1, ["--run-name"]),
        "run_name_dotdot": ([*ce, "--epochs", "1", "--run-name", ".."], 1, ["--run-name"]),
        "existing_run_name": ([*ce, "--epochs", "1", "--out-dir", fx / "runs", "--run-name", "done"], 1,
                              ["already exists", "--resume"]),
        # devices and kernels
        "unknown_device": ([*ce, "--epochs", "1", "--device", "tpu9"], 1, ["'tpu9'", "'cuda:N'"]),
        "cuda_graphs_on_a_cpu": ([*ce, "--epochs", "1", "--compile", "True", "--compile-mode", "reduce-overhead"], 1,
                                 ["--compile-mode reduce-overhead", "CUDA device"]),
        "compile_mode_without_compile": ([*ce, "--epochs", "1", "--compile-mode", "max-autotune"], 1,
                                         ["needs --compile True"]),
        # data
        "folder_root_is_a_file": ([*ce, "--epochs", "1", "--data.name", "folder", "--data.root", fx / "a_file"], 1,
                                  ["is not a directory"]),
        "folder_root_missing": ([*ce, "--epochs", "1", "--data.name", "folder", "--data.root", fx / "absent"], 1,
                                ["does not exist"]),
        "folder_one_class": ([*ce, "--epochs", "1", "--data.name", "folder", "--data.root", fx / "one_class"], 1,
                             ["one class folder", "at least two"]),
        "fashion_root_is_a_file": ([*ce, "--epochs", "1", "--data.name", "fashion_mnist", "--data.root", fx / "a_file"],
                                   1, ["is a file, not a folder"]),
        # resuming
        "resume_not_a_run": (["recipes.ce", "--resume", fx / "runs" / "not_a_run"], 1, ["is", "a run directory"]),
        "resume_garbage_header": (["recipes.ce", "--resume", fx / "runs" / "garbled", "--epochs", "2"], 1,
                                  ["header length", "exceeds the file"]),
        "resume_without_last": (["recipes.ce", "--resume", fx / "runs" / "no_last", "--epochs", "2"], 1,
                                ["last.safetensors is missing", "finished work"]),
        "resume_finished_run": (["recipes.ce", "--resume", done], 1, ["is finished", "--epochs N"]),
        "resume_another_recipe": (["recipes.kd", "--resume", done], 1, ["recipes.ce", "--resume"]),
        "resume_changed_flag": (["recipes.ce", "--resume", done, "--optim.lr", "0.5"], 1, ["--optim.lr"]),
        "resume_fewer_epochs": (["recipes.kd", "--resume", kd_run, "--epochs", "0"], 1, ["--epochs"]),
        "resume_replaced_teacher": (["recipes.kd", "--resume", kd_run, "--epochs", "2"], 1,
                                    ["has changed since the run started", "swapped_teacher.safetensors"]),
        # teachers
        "teacher_ckpt_is_a_folder": ([*kd, "--teachers.0.ckpt", fx / "ckpt_folder.safetensors"], 1, ["is a folder"]),
        "teacher_ckpt_is_a_train_state": ([*kd, "--teachers.0.ckpt", done / "last.safetensors"], 1,
                                          ["training-state checkpoint", "best.safetensors"]),
        "teacher_from_another_dataset": ([*kd, "--teachers.0.ckpt", fx / "cifar10_teacher.safetensors"], 1,
                                         ["fine-tuned on cifar10", "synthetic"]),
        "teacher_ckpt_truncated": ([*kd, "--teachers.0.ckpt", fx / "truncated.safetensors"], 1, ["truncated or corrupt"]),
        "teacher_ckpt_garbage_header": ([*kd, "--teachers.0.ckpt", fx / "garbage_header.safetensors"], 1,
                                        ["exceeds the file"]),
        "teacher_ckpt_under_a_file": (["recipes.teacher", *TINY, "--teacher.arch", "resnet8", "--teacher.pretrained",
                                       "False", "--ckpt", fx / "a_file" / "t.safetensors"], 1,
                                      ["is a file, not a folder", "--ckpt"]),
        "missing_teacher_ckpt_under_a_file": ([*kd, "--teachers.0.ckpt", fx / "a_file" / "t.safetensors"], 1,
                                              ["is a file, not a folder", "--teachers.0.ckpt"]),
        # the report
        "report_out_is_a_file": (["recipes.report", done, "--out", fx / "a_file"], 1, ["--out", "is a file"]),
        "report_corrupt_summary": (["recipes.report", fx / "runs" / "bad_summary", "--out", "rep"], 1,
                                   ["summary.json is unreadable"]),
        "report_png_is_a_folder": (["recipes.report", done, "--out", fx / "report_out"], 1, ["report.png is a folder"]),
        "report_no_run": (["recipes.report", fx / "absent", "--out", "rep"], 1, ["not a finished run directory"]),
        # parse errors: tyro's message, exit 2
        "unknown_flag": ([*ce, "--no-such-flag", "1"], 2, []),
        "wrong_type": ([*ce, "--epochs", "three"], 2, []),
        "unknown_recipe": (["recipes.no_such_recipe"], 2, []),
    }


CASES = sorted(case_args(Path("/x")))


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.fixture(scope="module")
def outcomes(fx, tmp_path_factory) -> dict:
    """Every case run once, two at a time (2 cores): each of two workers has its own copy of the fixtures
    and checksums it before and after each of its cases, so a change is still pinned to the case that made
    it. ``{name: (process, fixtures before, fixtures after, files in the case's directory, case directory)}``."""
    copy = tmp_path_factory.mktemp("fixtures_copy") / "fx"
    shutil.copytree(fx, copy)

    def work(root: Path, names: list[str]) -> dict:
        out = {}
        for name in names:
            args, _, _ = case_args(root)[name]
            cwd = tmp_path_factory.mktemp(f"case_{name}")
            before = snapshot(root)
            proc = launch(*args, cwd=cwd)
            out[name] = (proc, before, snapshot(root), snapshot(cwd), cwd)
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(work, root, CASES[i::2]) for i, root in enumerate((fx, copy))]
        return {name: outcome for job in jobs for name, outcome in job.result().items()}


@pytest.mark.parametrize("name", CASES)
def test_hostile_input_is_refused_cleanly(fx, outcomes, name):
    _, code, fragments = case_args(fx)[name]
    proc, before, after, created, cwd = outcomes[name]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    if code == 1:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
        for fragment in fragments:
            assert str(fragment) in lines[0], (fragment, lines[0])
    assert created == {}, "the command created files"
    assert after == before, "the command changed a fixture"
    assert not (cwd.parent / "escaped").exists()  # --run-name ../../escaped, relative to cwd/runs


def test_kernels_triton_on_a_cpu_without_the_interpreter(fx, tmp_path):
    before = snapshot(fx)
    proc = launch("recipes.ce", *TINY, *STUDENT, "--kernels", "triton", cwd=tmp_path,
                  env_drop=("TRITON_INTERPRET", "KD_KERNELS"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: --kernels triton on cpu") and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == {} and snapshot(fx) == before
