"""ASMB bridging: the student-aware stage A, attention fusion, the per-sample KD target, stages that interact,
resume across a stage boundary, and the CA-MKD baseline's teacher weights."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import kd.loop
from kd import tree as T
from kd.checkpoint import load_checkpoint, save_weights
from kd.config import ModelConfig
from kd.teachers import TeacherSpec
from kd.data import DataConfig, load_splits, train_batches
from kd.methods.camkd import camkd_kd, teacher_weights
from kd.methods.ibkd import (MBM, MBMConfig, ProjectionHead, StageAConfig, StageBConfig, StageBParts, stage_a_loss,
                             stage_b_loss, teacher_average)
from kd.modeling import build_net
from kd.step import apply_model
from recipes import ibkd

K = 5  # classes of the unit tests


def _stage_a_batch(n=6, c1=4, c2=6, cs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"f1": torch.randn(n, c1, generator=g), "f2": torch.randn(n, c2, generator=g),
            "s_pooled": torch.randn(n, cs, generator=g), "s_logits": 3 * torch.randn(n, K, generator=g),
            "y_a": torch.randint(0, K, (n,), generator=g)}


def _attn_mbm(adapters=2):
    torch.manual_seed(1)
    mbm = MBM(MBMConfig(kind="attn", z_dim=4, dropout=0.0), (4, 6), K, student_dim=3, adapters=adapters).train()
    for p in mbm.parameters():  # the adapters' up-projections start at 0: move every weight off its init
        p.data.add_(0.1 * torch.randn_like(p))
    return mbm


def test_stage_a_loss_equals_the_hand_formula_values_and_gradients():
    cfg = StageAConfig(beta=0.01, student_kd=0.7, student_kd_temperature=2.0, confidence_min=0.2)
    mbm = _attn_mbm()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in mbm.named_parameters()}
    batch = _stage_a_batch()
    torch.manual_seed(7)
    loss, (_, metrics) = stage_a_loss(mbm, cfg)({"mbm": params}, {}, {}, batch, torch.tensor(0))
    torch.manual_seed(7)
    eps = torch.randn(6, 4)

    # By hand, from the formulas of kd/methods/ibkd.py's docstring.
    p = params
    f1 = batch["f1"] + F.linear(torch.relu(F.linear(batch["f1"], p["adapters.0.down.weight"], p["adapters.0.down.bias"])),
                                p["adapters.0.up.weight"], p["adapters.0.up.bias"])
    f2 = batch["f2"] + F.linear(torch.relu(F.linear(batch["f2"], p["adapters.1.down.weight"], p["adapters.1.down.bias"])),
                                p["adapters.1.up.weight"], p["adapters.1.up.bias"])
    t1 = F.linear(f1, p["proj1.weight"], p["proj1.bias"])
    t2 = F.linear(f2, p["proj2.weight"], p["proj2.bias"])
    q = F.linear(batch["s_pooled"], p["query.weight"], p["query.bias"])
    s1, s2 = (q * t1).sum(1) / math.sqrt(6), (q * t2).sum(1) / math.sqrt(6)
    a1 = torch.exp(s1) / (torch.exp(s1) + torch.exp(s2))
    h = a1[:, None] * t1 + (1 - a1)[:, None] * t2
    mu = F.linear(h, p["mu.weight"], p["mu.bias"])
    logvar = F.linear(h, p["logvar.weight"], p["logvar.bias"]).clamp(-6, 2)
    z = mu + eps * torch.exp(0.5 * logvar)
    synergy = F.linear(z, p["head.weight"], p["head.bias"])
    ce = -torch.log(torch.softmax(synergy, 1)[torch.arange(6), batch["y_a"]]).mean()
    kl = (0.5 * (mu**2 + torch.exp(logvar) - 1 - logvar).sum(1)).mean()
    ps = torch.softmax(batch["s_logits"] / 2.0, 1)
    py = torch.softmax(synergy / 2.0, 1)
    bridge = 4.0 * (ps * torch.log(ps / py)).sum(1)
    weight = torch.exp(-logvar.mean(1)).clamp(0.2, 1.0).detach()
    want = ce + 0.01 * kl + 0.7 * (weight * bridge).mean()

    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(metrics["student_kd"]) == pytest.approx(float((weight * bridge).mean()), rel=1e-5)
    got = torch.autograd.grad(loss, list(params.values()))
    expected = torch.autograd.grad(want, list(params.values()))
    for name, g, e in zip(params, got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=name)


def test_the_bridging_term_waits_for_its_start_step():
    cfg = StageAConfig(student_kd=1.0, student_kd_start=3)
    mbm = _attn_mbm()
    params = {"mbm": {n: p.detach() for n, p in mbm.named_parameters()}}
    batch = _stage_a_batch()
    losses = {}
    for step in (2, 3):
        torch.manual_seed(0)
        losses[step], (_, m) = stage_a_loss(mbm, cfg, start_step=3)(params, {}, {}, batch, torch.tensor(step))
        assert float(m["student_kd_on"]) == float(step >= 3)
    torch.manual_seed(0)
    plain = stage_a_loss(mbm, dataclasses.replace(cfg, student_kd=0.0))(params, {}, {}, batch, torch.tensor(2))[0]
    assert float(losses[2]) == pytest.approx(float(plain), rel=1e-6)
    assert float(losses[3]) > float(plain)


def test_stage_a_gradient_reaches_mbm_head_and_adapters_never_the_student_or_teachers():
    mbm = _attn_mbm()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in mbm.named_parameters()}
    batch = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in _stage_a_batch().items()}
    loss = stage_a_loss(mbm, StageAConfig(student_kd=1.0))({"mbm": params}, {}, {}, batch, torch.tensor(0))[0]
    inputs = ["f1", "f2", "s_pooled", "s_logits"]
    grads = torch.autograd.grad(loss, [*params.values(), *(batch[k] for k in inputs)], allow_unused=True)
    for name, g in zip(params, grads[:len(params)]):
        assert g is not None and g.abs().sum() > 0, name  # adapters, projections, query, mu/logvar, head
    assert all(g is None for g in grads[len(params):]), "a gradient reached a cached teacher or student output"


@pytest.fixture(scope="module")
def tiny():
    data_cfg = DataConfig(name="synthetic", synthetic_size=48, val_size=16, batch_size=16, eval_batch_size=32,
                          prefetch=False)
    splits = load_splits(data_cfg, seed=0)
    teachers = tuple(build_net(ModelConfig(arch=a), splits.num_classes, torch.device("cpu"), seed=i)
                     for i, a in enumerate(("resnet8", "wrn_16_1")))
    return data_cfg, splits, teachers


def _stage_b(tiny, **stage_b):
    data_cfg, splits, teachers = tiny
    student = build_net(ModelConfig(arch="resnet8"), splits.num_classes, torch.device("cpu"), seed=3)
    torch.manual_seed(0)
    mbm = MBM(MBMConfig(kind="attn", z_dim=8), (64, 64), splits.num_classes, student_dim=64).eval()
    projection = ProjectionHead(64, 8, hidden=16).train()
    parts = StageBParts(student, projection, teachers, mbm, None, 8)
    params = {"student": student.params, "projection": dict(projection.named_parameters())}
    buffers = {"student": student.buffers, "projection": dict(projection.named_buffers())}
    frozen = {"teacher1": {"params": teachers[0].params, "buffers": teachers[0].buffers},
              "teacher2": {"params": teachers[1].params, "buffers": teachers[1].buffers},
              "mbm": dict(mbm.named_parameters())}
    batch = next(train_batches(splits, dataclasses.replace(data_cfg, mixup_alpha=0.4), seed=0, epoch=0))
    return stage_b_loss(parts, StageBConfig(**stage_b), total_steps=100), params, buffers, frozen, batch, parts


def test_stage_b_kd_targets(tiny):
    """'average' distils the teachers' average; 'auto' per sample whichever of synergy / average has the lower
    mixed-label CE; the gradient never reaches the frozen MBM or teachers (attention queried by the student)."""
    *_, parts = _stage_b(tiny)
    kd_of = {}
    for target in ("synergy", "average", "auto"):
        loss_fn, params, buffers, frozen, batch, _ = _stage_b(tiny, kd_target=target)
        loss, (_, m) = loss_fn(params, buffers, frozen, batch, torch.tensor(50))
        kd_of[target] = float(m["kd"])
        if target == "auto":
            picked = float(m["synergy_picked"])
    # by hand: the student's logits, the teachers' average and the synergy (queried by the student's feature)
    logits, feats, _ = apply_model(parts.student.train_skeleton, params["student"], T.clone(buffers["student"]),
                                   batch["x"], train=True)
    t = [apply_model(n.eval_skeleton, n.params, n.buffers, batch["x"], train=False) for n in parts.teachers]
    average = teacher_average([t[0][0], t[1][0]])
    with torch.no_grad():
        synergy = parts.mbm_eval(t[0][1]["pooled"], t[1][1]["pooled"], None, feats["pooled"])["logits"]
        synergy = synergy / frozen.get("synergy_scale", 1.0)
    temperature = 4.0

    def per_sample_kd(target):
        log_t = F.log_softmax(target / temperature, 1)
        return (log_t.exp() * (log_t - F.log_softmax(logits / temperature, 1))).sum(1) * temperature**2

    def label_ce(z):
        lam = batch["lam"]
        return lam * F.cross_entropy(z, batch["y_a"], reduction="none") + (1 - lam) * F.cross_entropy(
            z, batch["y_b"], reduction="none")

    pick = label_ce(synergy) <= label_ce(average)
    assert kd_of["synergy"] == pytest.approx(float(per_sample_kd(synergy).mean()), rel=1e-4)
    assert kd_of["average"] == pytest.approx(float(per_sample_kd(average).mean()), rel=1e-4)
    want_auto = torch.where(pick, per_sample_kd(synergy), per_sample_kd(average)).mean()
    assert kd_of["auto"] == pytest.approx(float(want_auto), rel=1e-4)
    assert picked == pytest.approx(float(pick.float().mean()))
    # no gradient into anything frozen
    loss_fn, params, buffers, frozen, batch, _ = _stage_b(tiny, kd_target="auto")
    leaves = {k: v.clone().requires_grad_(True) for k, v in T.flatten(frozen).items() if v.is_floating_point()}
    loss = loss_fn(params, buffers, T.unflatten(leaves), batch, torch.tensor(50))[0]
    assert all(g is None for g in torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))


def test_camkd_weights_and_loss_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, t1, t2 = (2 * torch.randn(4, K, generator=g) for _ in range(3))
    batch = {"y_a": torch.tensor([0, 1, 2, 3]), "y_b": torch.tensor([1, 1, 0, 4]), "lam": torch.tensor(0.7)}
    weights = teacher_weights([t1, t2], batch)
    kd, _ = camkd_kd(student, [t1, t2], batch, 4.0)
    want_kd = 0.0
    for i in range(4):
        losses = []
        for t in (t1, t2):
            p = [math.exp(v) for v in t[i].tolist()]
            ce = lambda y: -math.log(p[y] / sum(p))  # noqa: E731
            losses.append(0.7 * ce(int(batch["y_a"][i])) + 0.3 * ce(int(batch["y_b"][i])))
        e = [math.exp(v) for v in losses]
        w = [1 - e[0] / sum(e), 1 - e[1] / sum(e)]  # (1 - softmax) / (K - 1), K = 2
        assert weights[:, i].tolist() == pytest.approx(w, rel=1e-5)
        for wk, t in zip(w, (t1, t2)):
            pt = torch.softmax(t[i] / 4, 0)
            ps = torch.softmax(student[i] / 4, 0)
            want_kd += wk * 16 * float((pt * torch.log(pt / ps)).sum()) / 2  # divided by K as the authors do
    assert float(kd) == pytest.approx(want_kd / 4, rel=1e-5)
    assert torch.allclose(weights.sum(0), torch.ones(4))


# ----------------------------------------------------------------------------------------------
# Whole runs: stages that interact, resume across a stage boundary


@pytest.fixture
def one_thread():
    """Bit-exact comparisons of whole runs with one intra-op thread (as the README's studies run): with more,
    a CPU reduction's partial sums can meet in another order from one run to the next."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_ckpts(tmp_path_factory):
    """Two random 'fine-tuned' teachers on the synthetic data, saved as the teacher recipe saves them."""
    root = tmp_path_factory.mktemp("bridging_teachers")
    paths = []
    for i, arch in enumerate(("resnet8", "wrn_16_1")):
        net = build_net(ModelConfig(arch=arch), 10, torch.device("cpu"), seed=10 + i)
        path = root / f"{arch}.safetensors"
        save_weights(path, {"teacher": net.params}, {"teacher": net.buffers},
                     {"arch": arch, "num_classes": 10, "dataset": "synthetic", "val_acc": 10.0})
        paths.append(str(path))
    return paths


def _config(tmp, teacher_ckpts, name, **changes):
    a = StageAConfig(epochs=2, batch_size=16, student_kd=changes.pop("student_kd", 1.0), student_kd_start=0)
    cfg = dataclasses.replace(
        ibkd.CONFIG, student=ModelConfig(arch="resnet8"), epochs=changes.pop("epochs", 2), num_stages=2,
        teachers=(TeacherSpec(arch="resnet8", pretrained=False, ckpt=teacher_ckpts[0]),
                  TeacherSpec(arch="wrn_16_1", pretrained=False, ckpt=teacher_ckpts[1])),
        mbm=MBMConfig(kind=changes.pop("kind", "attn"), z_dim=16), stage_a=a, compile=False, device="cpu",
        disable_tqdm=True, kernels="reference", log_every=1, out_dir=str(tmp), run_name=name,
        data=DataConfig(name="synthetic", synthetic_size=48, val_size=16, batch_size=16, eval_batch_size=32,
                        mixup_alpha=0.2, cutmix_alpha=0.5, prefetch=False))
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=changes.pop("lr", 1e-3)), **changes)


def _mbm(run_dir, stage):
    return T.flatten(load_checkpoint(run_dir / f"mbm_stage{stage}.safetensors")[0]["params"])


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("student_kd,kind", [(1.0, "attn"), (0.0, "gate")])
def test_stage_two_sees_what_stage_one_did_to_the_student(tmp_path, teacher_ckpts, one_thread, student_kd, kind):
    """Two runs that differ only in the student's learning rate train the same stage-1 MBM; with the bridging
    term (and attention queried by the student) their stage-2 MBMs differ, without it (gate fusion) they are
    the same: stage 2's A sees the student stage 1's B produced, and nothing else of it."""
    runs = [ibkd.run(_config(tmp_path, teacher_ckpts, f"lr{lr}", lr=lr, student_kd=student_kd, kind=kind))
            for lr in (1e-3, 3e-2)]
    dirs = [tmp_path / f"lr{lr}" for lr in (1e-3, 3e-2)]
    assert _same(_mbm(dirs[0], 1), _mbm(dirs[1], 1))
    # Stage 2's MBMs: the same up to float rounding (a CPU matrix product can differ in its last bit between
    # runs, see the README) without the bridging term; far apart with it.
    difference = _max_difference(_mbm(dirs[0], 2), _mbm(dirs[1], 2))
    assert difference < 1e-5 if student_kd == 0.0 else difference > 1e-3, difference
    assert runs[0]["best_val_acc"] >= 0 and "stage2_synergy_val_acc" in runs[0]


@pytest.mark.parametrize("crash_after", [1, 2])
def test_resume_mid_stage_and_across_the_stage_boundary(tmp_path, teacher_ckpts, monkeypatch, one_thread, crash_after):
    """Killed after student epoch 1 (mid stage 1) or 2 (the boundary before stage A2) of a 4-epoch, 2-stage
    bridging run, then resumed in a fresh RNG state: the student at the stage boundary equals an uninterrupted
    run's bit for bit, and the run ends where it ends (to float rounding: a CPU matrix product in stage A2 can
    differ in its last bit between processes, see the README)."""
    original = kd.loop.save_train_state
    boundary = {}

    def save(path, state, meta, crash_at=None):
        original(path, state, meta)
        if path.name == "last.safetensors" and meta["epoch"] == 2:
            boundary[path.parent.name] = T.flatten(T.clone(state))
        if path.name == "last.safetensors" and meta["epoch"] == crash_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(kd.loop, "save_train_state", save)
    ibkd.run(_config(tmp_path, teacher_ckpts, "straight", epochs=4))
    monkeypatch.setattr(kd.loop, "save_train_state", lambda *a: save(*a, crash_at=crash_after))
    with pytest.raises(KeyboardInterrupt):
        ibkd.run(_config(tmp_path, teacher_ckpts, "interrupted", epochs=4))
    monkeypatch.setattr(kd.loop, "save_train_state", save)
    assert not (tmp_path / "interrupted" / "mbm_stage2.safetensors").exists()
    torch.manual_seed(12345)
    ibkd.main(["--resume", str(tmp_path / "interrupted"), "--disable-tqdm", "True"])
    assert boundary["straight"].keys() == boundary["interrupted"].keys()
    for key in boundary["straight"]:
        torch.testing.assert_close(boundary["interrupted"][key], boundary["straight"][key], rtol=0, atol=0, msg=key)
    straight = T.flatten(load_checkpoint(tmp_path / "straight" / "last.safetensors")[0]["state"])
    resumed = T.flatten(load_checkpoint(tmp_path / "interrupted" / "last.safetensors")[0]["state"])
    assert straight.keys() == resumed.keys() and int(resumed["step"]) == int(straight["step"])
    mbm = [_mbm(tmp_path / name, 2) for name in ("straight", "interrupted")]
    assert mbm[0].keys() == mbm[1].keys()
    for key in mbm[0]:
        torch.testing.assert_close(mbm[1][key], mbm[0][key], rtol=1e-3, atol=1e-4, msg=key)
    epochs = [line for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line and '"stage": ""' in line]
    assert len(epochs) == 4
