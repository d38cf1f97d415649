"""IB-KD and baseline loss terms against hand-written formulas, gradients, determinism, the stage-A cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kd import tree as T
from kd.config import ModelConfig
from kd.data import DataConfig, load_splits
from kd.methods.ibkd import (MBM, MBMConfig, ProjectionHead, StageAConfig, StageBConfig, StageBParts, logit_spread,
                             stage_a_loss, stage_b_loss, synergy_scale_factor)
from kd.stage_a import augmented_view, build_cache, cached_batches
from kd.step import apply_model
from kd.train import stage_boundaries
from kd.losses import hinton_kd
from kd.methods.fitnet import fitnet_hint
from kd.optim import lerp, ramp
from kd.modeling import build_net


def test_hinton_kd_hand_computed():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    T_ = 4.0
    p = [math.exp(v / T_) for v in t[0]]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / T_) for v in s[0]]
    q = [v / sum(q) for v in q]
    want = T_**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(hinton_kd(s, t, T_)) == pytest.approx(want, rel=1e-6)


def test_attention_transfer_hand_computed():
    # Student (1, 2, 2, 2) and teacher (1, 3, 2, 2): A = normalize(mean_c f^2) over 4 positions.
    fs = torch.arange(8.0).view(1, 2, 2, 2)
    ft = torch.ones(1, 3, 2, 2)
    a_s = (fs**2).mean(1).flatten()
    a_s = a_s / a_s.norm()
    a_t = torch.full((4,), 0.5)
    want = float(((a_s - a_t) ** 2).mean())
    assert float(kernels.attention_transfer_loss([fs], [ft])) == pytest.approx(want, rel=1e-6)


def test_fitnet_hint_pools_to_teacher_and_reaches_regressor():
    reg = nn.Conv2d(2, 3, 1)
    fs = torch.randn(2, 2, 8, 8, requires_grad=True)
    ft = torch.randn(2, 3, 4, 4)
    loss = fitnet_hint(reg(fs), ft)
    want = F.mse_loss(F.adaptive_avg_pool2d(reg(fs), 4), ft)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    loss.backward()
    assert reg.weight.grad.abs().sum() > 0 and fs.grad.abs().sum() > 0


def test_stage_b_schedules():
    r = torch.tensor
    assert float(ramp(r(0.03), 0.03)) == 0.0
    assert float(ramp(r(1.0), 0.03)) == pytest.approx(1.0)
    p = float(ramp(r(0.515), 0.03))
    assert p == pytest.approx(0.5)
    assert float(lerp(0.3, 0.6, r(p))) == pytest.approx(0.45) and float(lerp(6, 2.5, r(p))) == pytest.approx(4.25)
    assert float(0.8 * ramp(r(0.29), 0.3)) == 0.0 and float(0.8 * ramp(r(1.0), 0.3)) == pytest.approx(0.8)
    assert float(0.8 * ramp(r(0.65), 0.3)) == pytest.approx(0.4)
    assert float(lerp(1.0, 0.0, ramp(r(0.4), 0.5))) == 1.0
    assert float(lerp(1.0, 0.0, ramp(r(0.75), 0.5))) == pytest.approx(0.5)
    assert float(lerp(1.0, 0.0, ramp(r(1.0), 0.5))) == 0.0  # 0 = clipping off downstream, not clip-to-zero


def test_stage_boundaries_split_epochs():
    assert stage_boundaries(90, 1) == [(0, 90)]
    assert stage_boundaries(10, 3) == [(0, 3), (3, 6), (6, 10)]


def spec_stage_b_terms(z_student, mu, logvar, logits, synergy_logits, batch, temperature, label_smoothing):
    """SPEC 6's stage-B terms written out with plain torch ops, independently of kernels.reference."""
    precision = (1.0 / (logvar.exp() + 1e-6)).detach()
    precision = precision.clamp(max=torch.quantile(precision.flatten(), 0.99))
    mu_hat = F.normalize(mu, dim=1)
    mse = (precision * (z_student - mu_hat) ** 2).sum(1).mean()
    ang = 1 - F.cosine_similarity(z_student, mu, dim=1).mean()
    log_p_student = F.log_softmax(logits / temperature, 1)
    p_syn = F.softmax(synergy_logits / temperature, 1)
    kd = temperature**2 * (p_syn * (p_syn.log() - log_p_student)).sum(1).mean()
    lam = batch["lam"]
    ce = lam * F.cross_entropy(logits, batch["y_a"], label_smoothing=label_smoothing) + \
        (1 - lam) * F.cross_entropy(logits, batch["y_b"], label_smoothing=label_smoothing)
    return mse, ang, kd, ce


def test_ib_student_loss_matches_spec_formula():
    torch.manual_seed(0)
    n, z, k = 6, 8, 5
    z_s = F.normalize(torch.randn(n, z), dim=1)
    mu, logvar = torch.randn(n, z), torch.randn(n, z).clamp(-6, 2)
    logits, synergy = torch.randn(n, k), torch.randn(n, k)
    batch = {"y_a": torch.randint(0, k, (n,)), "y_b": torch.randint(0, k, (n,)), "lam": torch.tensor(0.3)}
    temperature = torch.tensor(3.0)
    got = kernels.ib_student_loss(z_s, mu, logvar, kernels.precision_clamp_value(logvar), logits, synergy,
                                  batch["y_a"], batch["y_b"], batch["lam"], temperature, label_smoothing=0.05)
    want = spec_stage_b_terms(z_s, mu, logvar, logits, synergy, batch, temperature, 0.05)
    for g, w in zip(got, want):
        assert float(g) == pytest.approx(float(w), rel=1e-5)


def test_mbm_is_deterministic_in_eval_and_samples_in_training():
    torch.manual_seed(0)
    mbm = MBM(MBMConfig(z_dim=16), (12, 8), 5)
    f1, f2 = torch.randn(4, 12), torch.randn(4, 8)
    mbm.eval()
    a, b = mbm(f1, f2), mbm(f1, f2)
    assert torch.equal(a["z"], a["mu"]) and torch.equal(a["logits"], b["logits"])
    mbm.train()
    eps = torch.randn(4, 16)
    out = mbm(f1, f2, eps)
    torch.testing.assert_close(out["z"], out["mu"] + eps * torch.exp(0.5 * out["logvar"]))
    kl = (-0.5 * (1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp())).sum(1)
    torch.testing.assert_close(out["kl"], kl)
    assert out["logvar"].min() >= -6 and out["logvar"].max() <= 2
    # gate starts at sigmoid(0) = 0.5; the vib variant concatenates
    assert float(torch.sigmoid(mbm.gate).mean()) == 0.5
    vib = MBM(MBMConfig(kind="vib", z_dim=16), (12, 8), 5)
    assert vib.mu.in_features == 20


@pytest.fixture(scope="module")
def tiny_setup():
    data_cfg = DataConfig(name="synthetic", synthetic_size=64, val_size=16, batch_size=16, eval_batch_size=32,
                          prefetch=False)
    splits = load_splits(data_cfg, seed=0)
    device = torch.device("cpu")
    teachers = tuple(build_net(ModelConfig(arch=a), splits.num_classes, device, seed=i)
                     for i, a in enumerate(("resnet8", "wrn_16_1")))
    return data_cfg, splits, device, teachers


def test_stage_a_cached_features_equal_recomputed(tiny_setup):
    data_cfg, splits, device, teachers = tiny_setup
    cache = build_cache(teachers, splits.train, splits, data_cfg, views=2, seed=0, device=device)
    mbm = MBM(MBMConfig(z_dim=8), (64, 64), splits.num_classes).train()
    params = {"mbm": dict(mbm.named_parameters())}
    loss_fn = stage_a_loss(mbm, StageAConfig(beta=1e-3))
    batch = next(cached_batches(cache, 16, seed=0, epoch=0))
    # The same images and views, recomputed through the teachers.
    generator = torch.Generator().manual_seed(0 * 7919 + 0)
    order = torch.randperm(len(cache.labels), generator=generator)
    views = torch.randint(0, 2, (len(cache.labels),), generator=generator)
    index, view = order[:16], views[:16]
    from kd.data import _normalize, _stats_on
    mean, std = _stats_on(splits, device)
    f1, f2 = [], []
    for i, v in zip(index.tolist(), view.tolist()):
        image = augmented_view(splits.train, v, seed=0).images[i:i + 1]
        x = _normalize(image, mean, std)
        with torch.no_grad():
            pooled = [apply_model(t.eval_skeleton, t.params, t.buffers, x, train=False)[1]["pooled"] for t in teachers]
        f1.append(pooled[0]), f2.append(pooled[1])
    recomputed = {**batch, "f1": torch.cat(f1), "f2": torch.cat(f2)}
    torch.testing.assert_close(batch["f1"], recomputed["f1"], atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    cached_loss = loss_fn(params, {}, {}, batch, torch.tensor(0))[0]
    torch.manual_seed(5)
    recomputed_loss = loss_fn(params, {}, {}, recomputed, torch.tensor(0))[0]
    assert float(cached_loss) == pytest.approx(float(recomputed_loss), rel=1e-5)
    assert views.unique().numel() == 2  # both views are used


def test_synergy_scale_factor_gives_the_teachers_spread():
    torch.manual_seed(0)
    t1, t2 = torch.randn(50, 10), 3 * torch.randn(50, 10)
    synergy = 7 * torch.randn(50, 10) + 2  # a per-sample shift does not change the spread
    s = synergy_scale_factor(synergy, (t1, t2))
    assert float(logit_spread(synergy / s)) == pytest.approx(float(logit_spread((t1 + t2) / 2)), rel=1e-5)
    hand = synergy.std(1).mean() / ((t1 + t2) / 2).std(1).mean()
    assert float(s) == pytest.approx(float(hand), rel=1e-6)


def test_stage_b_divides_the_synergy_logits_by_the_frozen_scale(tiny_setup):
    """With ``frozen["synergy_scale"]`` the KD term is the KL to the MBM's logits divided by it (the latent and
    CE terms unchanged); without the key, the MBM's logits as they are."""
    loss_fn, params, buffers, frozen, batch = _stage_b(tiny_setup, gamma=0.0)
    step = torch.tensor(50)
    _, (_, plain) = loss_fn(params, buffers, frozen, batch, step)
    _, (_, scaled) = loss_fn(params, buffers, {**frozen, "synergy_scale": torch.tensor(2.5)}, batch, step)
    assert float(scaled["ce"]) == pytest.approx(float(plain["ce"]), rel=1e-6)
    assert float(scaled["latent"]) == pytest.approx(float(plain["latent"]), rel=1e-6)
    assert abs(float(scaled["kd"]) - float(plain["kd"])) > 1e-4
    # the KD term by hand from the scaled synergy logits
    from kd.step import apply_model, call_stateless
    from kernels.reference import distillation_kl
    data_cfg, splits, device, teachers = tiny_setup
    with torch.no_grad():
        pooled = [apply_model(t.eval_skeleton, t.params, t.buffers, batch["x"], train=False)[1]["pooled"] for t in teachers]
        mbm = MBM(MBMConfig(z_dim=8), (64, 64), splits.num_classes).eval()
        synergy = call_stateless(mbm, frozen["mbm"], {}, *pooled, train=False)[0]["logits"] / 2.5
        student = build_net(ModelConfig(arch="resnet8"), splits.num_classes, device, seed=3)
        logits = apply_model(student.train_skeleton, params["student"], buffers["student"], batch["x"], train=True)[0]
    temperature = float(scaled["temperature"])
    want = distillation_kl(logits, F.log_softmax(synergy / temperature, dim=1), temperature)
    assert float(scaled["kd"]) == pytest.approx(float(want), rel=1e-4)


SPEC_SCHEDULE = dict(ce_alpha=1.0, kd_alpha_init=0.3, kd_alpha_final=0.6, kd_temperature_init=6.0,
                     kd_temperature_final=2.5)


def _stage_b(tiny_setup, gamma, **stage_b):
    data_cfg, splits, device, teachers = tiny_setup
    torch.manual_seed(0)
    student = build_net(ModelConfig(arch="resnet8"), splits.num_classes, device, seed=3)
    mbm = MBM(MBMConfig(z_dim=8), (64, 64), splits.num_classes).eval()
    projection = ProjectionHead(64, 8, hidden=16).train()
    adapters = (nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 1))
    parts = StageBParts(student, projection, teachers, mbm, adapters, 8)
    params = {"student": student.params, "projection": dict(projection.named_parameters()),
              "adapters": {"teacher1": dict(adapters[0].named_parameters()), "teacher2": dict(adapters[1].named_parameters())}}
    buffers = {"student": student.buffers, "projection": dict(projection.named_buffers()), "adapters": {}}
    frozen = {"teacher1": {"params": teachers[0].params, "buffers": teachers[0].buffers},
              "teacher2": {"params": teachers[1].params, "buffers": teachers[1].buffers},
              "mbm": dict(mbm.named_parameters())}
    loss_fn = stage_b_loss(parts, StageBConfig(gamma=gamma, **stage_b), total_steps=100)
    from kd.data import train_batches
    batch = next(train_batches(splits, data_cfg, seed=0, epoch=0))
    return loss_fn, params, buffers, frozen, batch


def test_feature_term_gradient_reaches_student(tiny_setup):
    with_feat, params, buffers, frozen, batch = _stage_b(tiny_setup, gamma=1.0)
    without_feat = _stage_b(tiny_setup, gamma=0.0)[0]
    params = T.detach(params)

    def grads_of(loss_fn):
        return torch.func.grad(lambda p: loss_fn(p, buffers, frozen, batch, torch.tensor(0))[0])(params)

    g1, g0 = grads_of(with_feat), grads_of(without_feat)
    # The original's feature term had zero gradient; here it changes the student's gradient.
    diff = (g1["student"]["layer3.0.conv1.weight"] - g0["student"]["layer3.0.conv1.weight"]).abs().max()
    assert diff > 1e-8
    assert g1["adapters"]["teacher1"]["weight"].abs().sum() > 0 and g1["adapters"]["teacher2"]["weight"].abs().sum() > 0
    assert float(with_feat(params, buffers, frozen, batch, torch.tensor(0))[1][1]["feat"]) > 0


def test_stage_b_loss_is_the_weighted_sum(tiny_setup):
    """SPEC 6's ramps (CE 1, KD 0.3 -> 0.6, T 6 -> 2.5) given explicitly; the defaults' constant ones below."""
    loss_fn, params, buffers, frozen, batch = _stage_b(tiny_setup, gamma=0.0, **SPEC_SCHEDULE)
    step = torch.tensor(80)  # r = 80/99: KD ramp and latent weight both active
    loss, (new_buffers, m) = loss_fn(params, buffers, frozen, batch, step)
    r = 80 / 99
    p = (r - 0.03) / 0.97
    alpha_kd, lam_lat = 0.3 + 0.3 * p, 1.0 * (r - 0.3) / 0.7  # latent_alpha 1.0
    assert float(m["alpha_kd"]) == pytest.approx(alpha_kd, rel=1e-5)
    assert float(m["temperature"]) == pytest.approx(6 - 3.5 * p, rel=1e-5)
    want = float(m["ce"]) + alpha_kd * float(m["kd"]) + lam_lat * float(m["latent"])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert not torch.equal(new_buffers["projection"]["bn1.running_mean"], buffers["projection"]["bn1.running_mean"])


def test_stage_b_defaults_are_the_validated_weights(tiny_setup):
    """The defaults (what the study's validation picked): CE 0.5 + KD 0.5 at a constant T 4, latent term scaled
    by 1/sqrt(z_dim) ramped to 1.0, synergy scaled to the teachers' spread, clipping off."""
    from kd.methods.ibkd import IBKDConfig
    cfg = IBKDConfig()
    assert (cfg.stage_b.synergy_scale, cfg.grad_clip_norm_init, cfg.stage_b.latent_norm) == ("teachers", 0.0, "sqrt")
    loss_fn, params, buffers, frozen, batch = _stage_b(tiny_setup, gamma=0.0)
    for step in (0, 50, 99):
        loss, (_, m) = loss_fn(params, buffers, frozen, batch, torch.tensor(step))
        assert float(m["alpha_kd"]) == pytest.approx(0.5) and float(m["temperature"]) == pytest.approx(4.0)
        lam_lat = max(0.0, (step / 99 - 0.3) / 0.7)
        want = 0.5 * float(m["ce"]) + 0.5 * float(m["kd"]) + lam_lat * float(m["latent"])
        assert float(loss) == pytest.approx(want, rel=1e-5)
