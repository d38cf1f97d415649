"""Data parallel training under torchrun, on CPU with gloo (2 processes, 1 thread each, tiny runs).

* 2 ranks with --dist.sync-bn compute what 1 process computes on the same global batch: parameters,
  BatchNorm statistics, optimizer state and EMA after the same steps agree to 2e-5 (fp32; the ranks sum
  partial statistics in another order), the logged losses to rel 1e-4, and the accuracies exactly.
* A 2-rank run killed with SIGKILL mid-training and resumed ends bit-identical to an uninterrupted one.
* A rank that dies ends the job, with torchrun's message, instead of hanging.
* IB-KD (sharded teacher cache, stage A and stage B) runs on 2 ranks; only rank 0 writes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd import tree as T
from kd.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.name", "synthetic", "--data.synthetic-size", "120", "--data.val-size", "40", "--data.batch-size", "16",
        "--data.eval-batch-size", "32", "--compile", "False", "--log-every", "1", "--disable-tqdm", "True",
        "--device", "cpu", "--seed", "0", "--student.arch", "resnet8"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "KD_KERNELS": "reference"}


def command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ROOT / "launch.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(ROOT / "launch.py"), *args]


def launch(nproc: int, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(nproc, *args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def state_of(run_dir: Path) -> dict[str, torch.Tensor]:
    tree, _ = load_checkpoint(run_dir / "last.safetensors")
    return T.flatten(tree["state"])


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.slow
def test_two_ranks_with_sync_bn_equal_one_process(tmp_path):
    args = ["recipes.ce", *TINY, "--epochs", "1", "--dist.sync-bn", "True", "--out-dir", "runs"]
    launch(1, *args, "--run-name", "one", cwd=tmp_path)
    launch(2, *args, "--run-name", "two", cwd=tmp_path)
    one, two = state_of(tmp_path / "runs" / "one"), state_of(tmp_path / "runs" / "two")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
    losses = [[r["loss"] for r in records(tmp_path / "runs" / name, "step")] for name in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) > 1  # each step logged once (rank 0 alone writes)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    summaries = [json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("one", "two")]
    for key in ("best_val_acc", "best_test_acc", "last_test_acc"):
        assert summaries[0][key] == summaries[1][key], key  # sharded evaluation sums every image once
    # the global batch: the images per second count every rank's shard (each logged step is one global batch
    # of 16, 8 on each rank), not rank 0's alone
    epoch = records(tmp_path / "runs" / "two", "epoch")[0]
    steps = [r for r in records(tmp_path / "runs" / "two", "step") if r["epoch"] == 1]
    assert epoch["images_per_second"] == pytest.approx(16 * len(steps) / epoch["seconds"], rel=1e-6)


@pytest.mark.slow
def test_two_rank_run_killed_with_sigkill_resumes_exactly(tmp_path):
    args = ["recipes.ce", *TINY, "--data.synthetic-size", "400", "--epochs", "4", "--out-dir", "runs"]
    launch(2, *args, "--run-name", "whole", cwd=tmp_path)

    run_dir = tmp_path / "runs" / "cut"
    proc = subprocess.Popen(command(2, *args, "--run-name", "cut"), cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once epoch 1 is checkpointed
        if (run_dir / "metrics.jsonl").is_file() and records(run_dir, "epoch"):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # torchrun's workers may run in sessions of their own: kill them too, or they finish the run meanwhile
    subprocess.run(["pkill", "-KILL", "-f", "--", "--run-name cut"], check=False)
    time.sleep(1)
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be interrupted"

    launch(2, "recipes.ce", "--resume", str(run_dir), cwd=tmp_path)
    whole, resumed = state_of(tmp_path / "runs" / "whole"), state_of(run_dir)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    epochs = [r["epoch"] for r in records(run_dir, "epoch")]
    assert epochs == [1, 2, 3, 4]  # no duplicate records of the interrupted epoch


@pytest.mark.slow
def test_a_dead_rank_ends_the_job(tmp_path):
    args = ["recipes.ce", *TINY, "--data.synthetic-size", "400", "--epochs", "50", "--out-dir", "runs",
            "--run-name", "dies", "--dist.timeout-s", "60"]
    proc = subprocess.Popen(command(2, *args), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    run_dir = tmp_path / "runs" / "dies"
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and records(run_dir, "step")):
        time.sleep(0.2)
    # torchrun's agent is proc.pid; the workers are its children: kill the one with the larger pid (rank 1
    # is started second), with SIGKILL, so it cannot say goodbye.
    children = sorted(int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                     text=True).stdout.split())
    assert len(children) == 2, children
    started = time.time()
    os.kill(children[-1], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - started < 120
    assert "Signal 9" in output or "SIGKILL" in output or "exitcode" in output, output[-2000:]
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_ibkd_on_two_ranks(tmp_path):
    for arch in ("resnet8", "wrn_16_1"):
        launch(1, "recipes.teacher", *[a for a in TINY if a not in ("--student.arch", "resnet8")], "--epochs", "1",
               "--teacher.arch", arch, "--teacher.pretrained", "False", "--ckpt", f"ck/{arch}.safetensors",
               "--out-dir", "runs_teacher", cwd=tmp_path)
    launch(2, "recipes.ibkd", *TINY, "--epochs", "1", "--teachers.0.arch", "resnet8", "--teachers.0.pretrained", "False",
           "--teachers.0.ckpt", "ck/resnet8.safetensors", "--teachers.1.arch", "wrn_16_1", "--teachers.1.pretrained",
           "False", "--teachers.1.ckpt", "ck/wrn_16_1.safetensors", "--stage-a.epochs", "2", "--stage-a.batch-size",
           "16", "--mbm.z-dim", "32", "--dist.sync-bn", "True", "--out-dir", "runs", "--run-name", "ibkd",
           cwd=tmp_path)
    run_dir = tmp_path / "runs" / "ibkd"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["synergy_test_acc"] <= 100 and 0 <= summary["best_test_acc"] <= 100
    steps = [r["step"] for r in records(run_dir, "step") if r["stage"] == ""]
    assert steps == sorted(set(steps))  # rank 0 alone logs: each step once
    assert (run_dir / "mbm_stage1.safetensors").is_file()


@pytest.mark.slow
def test_folder_dataset_on_two_ranks_equals_one_process(tmp_path):
    """ImageFolder data decoded per rank (each image's augmentation seeded by its place in the global
    batch), sync-bn: the 2-rank run ends where the 1-rank run ends (no mixing: folder data mixes within
    a rank's shard)."""
    from tests.test_folder_data import TEST_PER_CLASS, TRAIN_PER_CLASS, write_images

    write_images(tmp_path / "data" / "train", TRAIN_PER_CLASS, ".png", seed=0)
    write_images(tmp_path / "data" / "test", TEST_PER_CLASS, ".jpg", seed=1)
    args = ["recipes.ce", "--data.name", "folder", "--data.root", str(tmp_path / "data"), "--data.image-size", "32",
            "--data.workers", "0", "--data.val-size", "6", "--data.batch-size", "6", "--data.eval-batch-size", "4",
            "--data.mixup-alpha", "0", "--data.cutmix-alpha", "0", "--epochs", "2", "--compile", "False",
            "--student.arch", "resnet8", "--device", "cpu", "--disable-tqdm", "True", "--log-every", "1",
            "--dist.sync-bn", "True", "--out-dir", "runs"]
    launch(1, *args, "--run-name", "one", cwd=tmp_path)
    launch(2, *args, "--run-name", "two", cwd=tmp_path)
    one, two = state_of(tmp_path / "runs" / "one"), state_of(tmp_path / "runs" / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")
    summaries = [json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("one", "two")]
    assert summaries[0]["best_test_acc"] == summaries[1]["best_test_acc"]


def test_a_global_batch_the_ranks_do_not_divide_is_refused_once_before_the_group_forms(tmp_path):
    proc = subprocess.run(command(2, "recipes.ce", *TINY, "--data.batch-size", "15", "--epochs", "1",
                                  "--optim.warmup-epochs", "0", "--out-dir", str(tmp_path / "runs")),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: --data.batch-size 15 is the global batch and must be divisible by the 2 ranks of this "
                    "torchrun job (e.g. 14)"], proc.stderr[-3000:]
    assert "kd/" not in proc.stderr  # no traceback through the project's code: it stopped before any work
    assert not (tmp_path / "runs").exists()
