"""The compiled train step runs the project's Triton kernels (forward and custom backward) and gives the
same numbers as the compiled step on the pure-torch references.

On a CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py). For IB-KD stage A, stage B
and AT on CIFAR-style models (resnet8, wrn_16_1), three compiled steps with ``backend="triton"`` and
three with ``backend="reference"`` (SGD, momentum 0.9, lr 0.01) from the same state and batches must
agree: the loss of every step, the gradient of every parameter (the momentum buffer after step 1 is the
gradient), and the parameters, optimizer state, BatchNorm statistics and EMA after step 3. Tolerance:
rtol 1e-4, atol 1e-5 (fp32; the kernels reduce in another order than the references). lr 0.01 because
with AT's weight of 1000 larger steps make training chaotic enough to grow a 1e-7 difference past any
tolerance. ``kernels.LAUNCHES`` proves which path ran.
"""

import dataclasses

import pytest
import torch

import kernels
from kd import tree as T
from kd.config import ModelConfig
from kd.data import DataConfig, load_splits, train_batches
from kd.methods.ibkd import MBM, MBMConfig, ProjectionHead, StageAConfig, StageBConfig, StageBParts, stage_a_loss, stage_b_loss
from kd.modeling import build_net
from kd.optim import sgd
from kd.step import compile_step, init_state, make_train_step

pytestmark = pytest.mark.skipif(not kernels._dispatch.interpreting() and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 3


@pytest.fixture(scope="module")
def data():
    cfg = DataConfig(name="synthetic", synthetic_size=64, synthetic_classes=10, val_size=16, batch_size=8,
                     prefetch=False, mixup_alpha=0.2, cutmix_alpha=0.5, cutmix_prob=0.5)
    splits = load_splits(cfg, seed=0)
    batches = [b for _, b in zip(range(STEPS), train_batches(splits, cfg, seed=0, epoch=0, device=DEVICE))]
    return splits, batches


def nets(splits):
    student = build_net(ModelConfig(arch="resnet8"), splits.num_classes, DEVICE, seed=1)
    teachers = tuple(build_net(ModelConfig(arch=a), splits.num_classes, DEVICE, seed=2 + i)
                     for i, a in enumerate(("resnet8", "wrn_16_1")))
    return student, teachers


def frozen_teachers(teachers):
    return {f"teacher{i + 1}": {"params": t.params, "buffers": t.buffers} for i, t in enumerate(teachers)}


def stage_a_case(splits, batches, backend):
    torch.manual_seed(0)
    mbm = MBM(MBMConfig(z_dim=16), (64, 64), splits.num_classes, backend=backend).to(DEVICE).train()
    params = {"mbm": {n: p.detach() for n, p in mbm.named_parameters()}}
    g = torch.Generator().manual_seed(0)
    feature_batches = [{"f1": torch.randn(8, 64, generator=g).to(DEVICE), "f2": torch.randn(8, 64, generator=g).to(DEVICE),
                        "y_a": b["y_a"], "y_b": b["y_a"], "lam": torch.ones((), device=DEVICE)} for b in batches]
    return stage_a_loss(mbm, StageAConfig(beta=1e-3)), params, {}, {}, feature_batches


def stage_b_case(splits, batches, backend):
    student, teachers = nets(splits)
    torch.manual_seed(0)
    mbm = MBM(MBMConfig(z_dim=16), (64, 64), splits.num_classes).to(DEVICE).eval()
    projection = ProjectionHead(64, 16, hidden=32).to(DEVICE).train()
    parts = StageBParts(student, projection, teachers, mbm, None, 16)
    params = {"student": student.params, "projection": {n: p.detach() for n, p in projection.named_parameters()}}
    buffers = {"student": student.buffers, "projection": {n: b.detach() for n, b in projection.named_buffers()}}
    frozen = {**frozen_teachers(teachers), "mbm": {n: p.detach() for n, p in mbm.named_parameters()}}
    # total_steps 4: steps 0..2 cover the KD warm-up, the ramp and the latent term (r >= 0.3).
    loss_fn = stage_b_loss(parts, StageBConfig(latent_norm="sqrt"), total_steps=4, backend=backend)
    return loss_fn, params, buffers, frozen, batches


def at_case(splits, batches, backend):
    from kd.methods import at as at_method
    from recipes import at

    student, teachers = nets(splits)
    cfg = dataclasses.replace(at.CONFIG, kernels=backend)
    loss_fn = at_method.make_loss(cfg, student, {"teacher": teachers[1]}, DEVICE, 3).fn
    frozen = {"teacher": {"params": teachers[1].params, "buffers": teachers[1].buffers}}
    return loss_fn, {"student": student.params}, {"student": student.buffers}, frozen, batches


CASES = {"ibkd_stage_a": (stage_a_case, {"ib_reparam_kl_forward", "ib_reparam_kl_backward"}),
         "ibkd_stage_b": (stage_b_case, {"ib_student_loss_forward", "ib_student_loss_backward"}),
         "at": (at_case, {"attention_transfer_pair_forward", "attention_transfer_pair_backward"})}


def run_compiled(case, splits, batches, backend):
    loss_fn, params, buffers, frozen, case_batches = case(splits, batches, backend)
    optimizer = sgd(momentum=0.9)  # no weight decay: the momentum after step 1 is exactly the gradient
    step = compile_step(make_train_step(loss_fn, optimizer, lambda s: torch.tensor(0.01, device=DEVICE),
                                        device_type=DEVICE.type), True)
    state = init_state(params, buffers, optimizer, frozen=frozen, ema=True)
    torch.manual_seed(123)  # stage A samples eps inside the step
    before = kernels.LAUNCHES.copy()
    losses, first_moment = [], None
    for i, batch in enumerate(case_batches):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        if i == 0:
            first_moment = T.clone(state["opt"]["momentum"])
    launched = kernels.LAUNCHES - before
    return torch.stack(losses), first_moment, state, launched


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_triton_step_equals_compiled_reference(name, data):
    case, ops = CASES[name]
    splits, batches = data
    torch._dynamo.reset()
    ref_losses, ref_moment, ref_state, ref_launched = run_compiled(case, splits, batches, "reference")
    tri_losses, tri_moment, tri_state, tri_launched = run_compiled(case, splits, batches, "triton")

    assert not ref_launched, f"the reference step launched Triton kernels: {dict(ref_launched)}"
    # Every step ran the kernel's forward and its custom backward (the backward is what the upstream
    # bug would have dropped), and nothing else.
    per_step = len(at_stage_pairs()) if name == "at" else 1  # AT launches once per stage pair
    assert dict(tri_launched) == {op: STEPS * per_step for op in ops}, dict(tri_launched)

    torch.testing.assert_close(tri_losses, ref_losses, rtol=1e-4, atol=1e-5)
    # Gradients: after the first SGD step the momentum buffer is the gradient, for every parameter.
    for key, ref in T.flatten(ref_moment).items():
        torch.testing.assert_close(T.flatten(tri_moment)[key], ref, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    for tree in ("params", "opt", "buffers", "ema"):
        ref_flat, tri_flat = T.flatten(ref_state[tree]), T.flatten(tri_state[tree])
        assert ref_flat.keys() == tri_flat.keys()
        for key, ref in ref_flat.items():
            torch.testing.assert_close(tri_flat[key], ref, rtol=1e-4, atol=1e-5, msg=lambda m, tree=tree, key=key: f"{tree}/{key}: {m}")


def at_stage_pairs():
    from recipes import at

    return at.CONFIG.stages


def test_step_benchmark_writes_its_table(tmp_path):
    """recipes.bench_distill runs every asked provider and writes one row each (tiny shapes, eager here;
    the compiled providers are the ones the GPU script times)."""
    from recipes import bench_distill

    cfg = bench_distill.BenchDistillConfig(
        batch_sizes=(4,), providers=("eager+reference", "eager+triton"), student=ModelConfig(arch="resnet8"),
        teachers=(ModelConfig(arch="resnet8"), ModelConfig(arch="wrn_16_1")), num_classes=10, z_dim=16,
        steps=1, warmup=1, rounds=1, device=str(DEVICE), out=str(tmp_path))
    before = kernels.LAUNCHES.copy()
    rows = bench_distill.run(cfg)
    assert [(r["method"], r["provider"]) for r in rows] == [
        (m, p) for m in ("ibkd_stage_b", "at") for p in ("eager+reference", "eager+triton")]
    for r in rows:  # a measured rate, consistent with the step time and between the fastest and slowest round
        assert r["status"] == "ok" and r["images_per_s"] == pytest.approx(r["batch_size"] * 1000 / r["step_ms"])
        assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"] < float("inf")
    assert (kernels.LAUNCHES - before)["ib_student_loss_forward"] == 2  # warm-up + timed step, triton only
    assert (tmp_path / "bench_distill.csv").read_text().count("\n") == 5
    assert "| at | 4 | eager+triton |" in (tmp_path / "bench_distill.md").read_text()
