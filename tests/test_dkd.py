"""Decoupled KD and ensemble KD: the losses against straightforward hand-written formulas (explicit binary
probabilities, explicit loops), the recipes' losses on real tiny networks, and both recipes through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd.config import ModelConfig
from kd.checkpoint import read_metadata
from kd.losses import hinton_kd
from kd.methods.dkd import dkd_loss, dkd_terms, mixed_dkd_terms
from kd.methods.ensemble_kd import ensemble_kd
from kd.optim import progress, ramp
from kd.modeling import build_net
from kd.step import mixed_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
# Tiny synthetic data in batches of 16: a few steps per epoch.
TINY = ["--data.name", "synthetic", "--data.synthetic-size", "120", "--data.val-size", "40",
        "--data.batch-size", "16", "--data.eval-batch-size", "64", "--epochs", "1", "--compile", "False",
        "--log-every", "1", "--disable-tqdm", "True", "--device", "cpu", "--seed", "0"]


def explicit_dkd(student, teacher, target, temperature):
    """TCKD and NCKD one sample at a time, in float64, from the probabilities as the paper writes them."""
    tckd, nckd = 0.0, 0.0
    n, classes = student.shape
    for i in range(n):
        p_s = torch.softmax(student[i].double() / temperature, 0)
        p_t = torch.softmax(teacher[i].double() / temperature, 0)
        y = int(target[i])
        b_s = torch.stack([p_s[y], 1 - p_s[y]])
        b_t = torch.stack([p_t[y], 1 - p_t[y]])
        tckd = tckd + (b_t * (b_t / b_s).log()).sum()
        others = [j for j in range(classes) if j != y]
        q_s = p_s[others] / (1 - p_s[y])
        q_t = p_t[others] / (1 - p_t[y])
        nckd = nckd + (q_t * (q_t / q_s).log()).sum()
    return temperature**2 * tckd / n, temperature**2 * nckd / n


def random_logits(n=6, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, classes, generator=g), 3 * torch.randn(n, classes, generator=g),
            torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_equal_explicit_formula(temperature):
    student, teacher, target = random_logits()
    tckd, nckd = dkd_terms(student, teacher, target, temperature)
    want_tckd, want_nckd = explicit_dkd(student, teacher, target, temperature)
    assert float(tckd) == pytest.approx(float(want_tckd), rel=1e-4, abs=1e-6)
    assert float(nckd) == pytest.approx(float(want_nckd), rel=1e-4, abs=1e-6)
    assert float(want_tckd) > 1e-3 and float(want_nckd) > 1e-3  # the comparison is not 0 == 0
    loss = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=temperature)
    assert float(loss) == pytest.approx(float(want_tckd + 8.0 * want_nckd), rel=1e-4)


def test_dkd_terms_keep_float64_and_match_the_formula_to_float64_precision():
    student, teacher, target = random_logits()
    student, teacher = student.double(), teacher.double()
    tckd, nckd = dkd_terms(student, teacher, target, 4.0)
    assert tckd.dtype == nckd.dtype == torch.float64  # an fp64 check means fp64, not fp32 in disguise
    want_tckd, want_nckd = explicit_dkd(student, teacher, target, 4.0)
    assert float(tckd) == pytest.approx(float(want_tckd), rel=1e-10)
    assert float(nckd) == pytest.approx(float(want_nckd), rel=1e-10)
    half = dkd_terms(student.to(torch.bfloat16), teacher.to(torch.bfloat16), target, 4.0)
    assert half[0].dtype == torch.float32  # half-precision logits are computed in fp32


def test_dkd_decomposes_hinton_kd():
    """Per sample, Hinton's KD = TCKD + (1 - p_t^teacher) * NCKD (the identity the method is built on)."""
    student, teacher, target = random_logits(n=1, classes=9, seed=3)
    tckd, nckd = dkd_terms(student, teacher, target, 2.0)
    p_target = torch.softmax(teacher / 2.0, 1)[0, target[0]]
    assert float(tckd + (1 - p_target) * nckd) == pytest.approx(float(hinton_kd(student, teacher, 2.0)), rel=1e-4)


def test_mixed_targets_are_lam_weighted():
    student, teacher, y_a = random_logits(n=8, classes=5, seed=1)
    y_b = torch.roll(y_a, 1)
    y_b[0] = (y_a[0] + 1) % 5  # at least one sample whose two targets differ
    lam = torch.tensor(0.3)
    tckd, nckd = mixed_dkd_terms(student, teacher, {"y_a": y_a, "y_b": y_b, "lam": lam}, 4.0)
    tckd_a, nckd_a = explicit_dkd(student, teacher, y_a, 4.0)
    tckd_b, nckd_b = explicit_dkd(student, teacher, y_b, 4.0)
    assert float(tckd) == pytest.approx(float(0.3 * tckd_a + 0.7 * tckd_b), rel=1e-4)
    assert float(nckd) == pytest.approx(float(0.3 * nckd_a + 0.7 * nckd_b), rel=1e-4)
    assert abs(float(tckd_a - tckd_b)) > 1e-3  # the weighting is visible


def test_confident_networks_stay_finite():
    student, teacher, target = random_logits(n=4, classes=6, seed=2)
    teacher[torch.arange(4), target] = 400.0  # p_target = 1 in float32: log(1 - p_t) would be log(0)
    student.requires_grad_(True)
    tckd, nckd = dkd_terms(student, teacher, target, 1.0)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd) and torch.isfinite(student.grad).all()


def test_gradients_reach_the_student_only_and_match_the_formula():
    student, teacher, target = random_logits(n=5, classes=6, seed=4)
    student64 = student.double().requires_grad_(True)
    tckd, nckd = explicit_dkd(student64, teacher.double(), target, 4.0)
    (tckd + 8.0 * nckd).backward()
    student = student.requires_grad_(True)
    teacher = teacher.requires_grad_(True)
    dkd_loss(student, teacher, target, 1.0, 8.0, 4.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-6)
    teachers = [torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)]
    student.grad = None
    ensemble_kd(student, teachers, 4.0).backward()
    assert all(t.grad is None for t in teachers) and student.grad.abs().sum() > 0


def test_warmup_ramp_values():
    total = 241  # progress r = step / 240
    values = [float(ramp(progress(torch.tensor(s), total), 0.0, 20 / 240)) for s in (0, 5, 10, 20, 21, 240)]
    assert values == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0, 1.0])
    assert float(ramp(progress(torch.tensor(0), total), 0.0, 0.0)) == 1.0


def test_ensemble_target_is_the_mean_of_tempered_softmaxes():
    student, teacher1, _ = random_logits(n=6, classes=7, seed=5)
    teacher2 = 2 * torch.randn(6, 7)
    target = (torch.softmax(teacher1.double() / 4, 1) + torch.softmax(teacher2.double() / 4, 1)) / 2
    log_student = torch.log_softmax(student.double() / 4, 1)
    want = 16 * (target * (target.log() - log_student)).sum(1).mean()
    assert float(ensemble_kd(student, [teacher1, teacher2], 4.0)) == pytest.approx(float(want), rel=1e-5)
    # two copies of one teacher are Hinton KD from that teacher; two different teachers are not
    assert float(ensemble_kd(student, [teacher1, teacher1], 4.0)) == pytest.approx(
        float(hinton_kd(student, teacher1, 4.0)), rel=1e-6)
    assert abs(float(want) - float(hinton_kd(student, teacher1, 4.0))) > 1e-3


# ----------------------------------------------------------------------------------------------
# The recipes' losses on tiny real networks


def tiny_net(arch, seed):
    return build_net(ModelConfig(arch=arch), 10, torch.device("cpu"), seed=seed)


def as_frozen(net):
    return {"params": net.params, "buffers": net.buffers}


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    y_a = torch.randint(0, 10, (4,), generator=g)
    return {"x": torch.randn(4, 3, 32, 32, generator=g), "y_a": y_a, "y_b": torch.roll(y_a, 1),
            "lam": torch.tensor(0.6)}


def test_dkd_recipe_loss_warms_up_per_step():
    from kd.methods import dkd as dkd_method
    from recipes import dkd

    student, teacher = tiny_net("resnet8", 1), tiny_net("resnet8", 2)
    total = 241
    loss_fn = dkd_method.make_loss(dkd.CONFIG, student, {"teacher": teacher}, torch.device("cpu"), total).fn
    params, buffers = {"student": student.params}, {"student": student.buffers}
    batch = tiny_batch()
    for step, warm in ((0, 0.0), (10, 0.5), (30, 1.0)):
        loss, (new_buffers, metrics) = loss_fn(params, buffers, {"teacher": as_frozen(teacher)}, batch,
                                               torch.tensor(step))
        assert float(metrics["warm"]) == pytest.approx(warm)
        assert float(metrics["nckd"]) > 1e-4
        want = metrics["ce"] + warm * (1.0 * metrics["tckd"] + 8.0 * metrics["nckd"])
        assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert new_buffers["student"] is not buffers["student"]  # BN statistics come back as new state
    grads = torch.func.grad(lambda p: loss_fn(p, buffers, {"teacher": as_frozen(teacher)}, batch,
                                              torch.tensor(30))[0])(params)
    assert sum(float(g.abs().sum()) for g in grads["student"].values()) > 0


def test_ensemble_recipe_loss_uses_both_teachers():
    from kd.step import apply_model
    from kd.methods import ensemble_kd as ensemble_method
    from recipes import ensemble_kd as recipe

    student = tiny_net("resnet8", 1)
    teachers = {"teacher1": tiny_net("resnet8", 2), "teacher2": tiny_net("wrn_16_1", 3)}
    loss_fn = ensemble_method.make_loss(recipe.CONFIG, student, teachers, torch.device("cpu"), 10).fn
    batch = tiny_batch()
    frozen = {name: as_frozen(net) for name, net in teachers.items()}
    loss, (_, metrics) = loss_fn({"student": student.params}, {"student": student.buffers}, frozen, batch,
                                 torch.tensor(0))
    teacher_logits = [apply_model(net.eval_skeleton, net.params, net.buffers, batch["x"], train=False)[0]
                      for net in teachers.values()]
    logits = apply_model(student.train_skeleton, student.params, student.buffers, batch["x"], train=True)[0]
    probs = [F.softmax(t.double() / 4, 1) for t in teacher_logits]
    target = (probs[0] + probs[1]) / 2
    want_kd = 16 * (target * (target.log() - F.log_softmax(logits.double() / 4, 1))).sum(1).mean()
    assert float(metrics["kd"]) == pytest.approx(float(want_kd), rel=1e-4)
    ce = mixed_cross_entropy(logits, batch, 0.0)
    assert float(loss) == pytest.approx(float(0.1 * ce + 0.9 * want_kd), rel=1e-4)


def test_ensemble_defaults_match_ibkd_teachers():
    from recipes import ensemble_kd, ibkd, kd

    for name in ("teachers", "teacher_epochs", "student", "epochs", "data", "optim"):
        assert getattr(ensemble_kd.CONFIG, name) == getattr(ibkd.CONFIG, name), name
    assert (ensemble_kd.CONFIG.temperature, ensemble_kd.CONFIG.alpha) == (kd.CONFIG.temperature, kd.CONFIG.alpha)


# ----------------------------------------------------------------------------------------------
# Through the CLI


def launch(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KD_KERNELS": "reference"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One tiny fine-tuned teacher; the ensemble's second teacher is fine-tuned by the recipe itself."""
    work = tmp_path_factory.mktemp("dkd")
    launch("recipes.teacher", *TINY, "--teacher.arch", "resnet8", "--teacher.pretrained", "False",
           "--ckpt", "ck/resnet8.safetensors", "--out-dir", "runs_teacher", cwd=work)
    return work


def only_run(out: Path) -> Path:
    found = list(out.iterdir())
    assert len(found) == 1, found
    return found[0]


def test_dkd_cli_smoke(workdir):
    out = workdir / "runs_dkd"
    proc = launch("recipes.dkd", *TINY, "--epochs", "2", "--student.arch", "resnet8", "--teachers.0.arch", "resnet8",
                  "--teachers.0.pretrained", "False", "--teachers.0.ckpt", "ck/resnet8.safetensors", "--warmup-frac", "0.5",
                  "--out-dir", str(out), cwd=workdir)
    run_dir = only_run(out)
    assert run_dir.name.startswith("dkd-") and "| best |" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "dkd" and summary["teachers"] == ["resnet8"]
    # the accuracies are those of the weights the run wrote (its golden losses are in tests/test_recipes.py)
    assert summary["best_val_acc"] == json.loads(read_metadata(run_dir / "best.safetensors")["val_acc"])
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records(run_dir, "epoch"))
    steps = records(run_dir, "step")  # every step is logged
    total = len(steps)
    assert total >= 6 and [s["step"] for s in steps] == list(range(1, total + 1))
    # r = step / (total - 1), warm-up over half of training: warm = min(1, r / 0.5); the step counter is 0 at
    # the first step
    assert [s["warm"] for s in steps] == pytest.approx([min(1.0, k / (total - 1) / 0.5) for k in range(total)],
                                                       abs=1e-6)
    assert all(s["tckd"] >= 0 and s["nckd"] > 0 for s in steps)


def test_ensemble_kd_cli_smoke_fine_tunes_the_missing_teacher(workdir):
    out = workdir / "runs_ens"
    proc = launch("recipes.ensemble_kd", *TINY, "--student.arch", "resnet8", "--teachers.0.arch", "resnet8",
                  "--teachers.0.pretrained", "False", "--teachers.0.ckpt", "ck/resnet8.safetensors",
                  "--teachers.1.arch", "wrn_16_1", "--teachers.1.pretrained", "False",
                  "--teachers.1.ckpt", "ck/wrn_16_1.safetensors", "--teacher-epochs", "1", "--out-dir", str(out),
                  cwd=workdir)
    assert "ck/wrn_16_1.safetensors is missing" in proc.stdout
    assert (workdir / "ck" / "wrn_16_1.safetensors").is_file()
    run_dir = next(d for d in out.iterdir() if d.name.startswith("ensemble_kd-"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "ensemble_kd" and summary["teachers"] == ["resnet8", "wrn_16_1"]
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records(run_dir, "epoch"))
    assert all(s["kd"] > 0 for s in records(run_dir, "step"))
