"""The pure train step: equals an ordinary torch loop, never mutates its input, compiles to the same numbers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd import tree as T
from kd.optim import adamw, sgd
from kd.step import (AmpConfig, apply_model, clip_coefficient, compile_step, ema_decay, init_state,
                     make_train_step, mixed_cross_entropy)


class Tiny(nn.Module):
    """conv-BN-ReLU-pool-linear returning (logits, features) like the project's models."""

    def __init__(self, num_classes=5, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)  # a bias before BN has ~0 gradient: Adam amplifies noise
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        f = F.relu(self.bn(self.conv(x)))
        pooled = f.mean((2, 3))
        return self.fc(self.drop(pooled)), {"stage4": f, "pooled": pooled}


def _batch(seed=0, n=8, k=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    return {"x": torch.randn(n, 3, 8, 8, generator=g), "y_a": y, "y_b": y.roll(1), "lam": torch.tensor(0.7)}


def _setup(model, optimizer, clip=0.0, smoothing=0.1, ema=True, amp=AmpConfig()):
    params = {"m": {k: v.detach().clone() for k, v in model.named_parameters()}}
    buffers = {"m": {k: v.detach().clone() for k, v in model.named_buffers()}}

    def loss_fn(p, b, frozen, batch, step):
        logits, _, nb = apply_model(model, p["m"], b["m"], batch["x"], train=True)
        return mixed_cross_entropy(logits, batch, smoothing), ({"m": nb}, {})

    step = make_train_step(loss_fn, optimizer, lambda s: 0.1 * torch.ones(()) / (1 + s.float()),
                           clip_fn=lambda s: torch.tensor(clip), amp=amp)
    return init_state(params, buffers, optimizer, ema=ema, amp=amp), step


def test_matches_ordinary_torch_loop():
    torch.manual_seed(0)
    model = Tiny().train()
    reference = copy.deepcopy(model)
    state, step = _setup(model, sgd(0.9, 5e-4, nesterov=True), clip=0.5)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for i in range(5):
        batch = _batch(i)
        state, metrics = step(state, batch)
        for group in opt.param_groups:
            group["lr"] = 0.1 / (1 + i)
        logits, _ = reference(batch["x"])
        loss = 0.7 * F.cross_entropy(logits, batch["y_a"], label_smoothing=0.1) + \
            0.3 * F.cross_entropy(logits, batch["y_b"], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
        torch.testing.assert_close(metrics["loss"], loss.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(metrics["grad_norm"], norm, atol=1e-5, rtol=1e-6)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state["params"]["m"][name], p.detach(), atol=1e-6, rtol=0)
    for name, b in reference.named_buffers():
        torch.testing.assert_close(state["buffers"]["m"][name], b, atol=1e-6, rtol=0)
    assert int(state["step"]) == 5


def test_step_never_mutates_its_input():
    torch.manual_seed(0)
    state, step = _setup(Tiny().train(), adamw(weight_decay=0.01))
    before = {k: v.clone() for k, v in T.flatten(state).items()}
    new_state, _ = step(state, _batch())
    after = T.flatten(state)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    changed = [k for k, v in T.flatten(new_state).items() if not torch.equal(v, before[k])]
    assert any(k.startswith("buffers/m/bn.running_mean") for k in changed)  # BN statistics come back
    assert any(k.startswith("params/") for k in changed) and any(k.startswith("ema/") for k in changed)


def test_clip_coefficient_threshold_zero_means_off():
    norm = torch.tensor(10.0)
    assert float(clip_coefficient(norm, torch.tensor(0.0))) == 1.0
    assert float(clip_coefficient(norm, torch.tensor(2.0))) == pytest.approx(2.0 / (10.0 + 1e-6))
    assert float(clip_coefficient(torch.tensor(1.0), torch.tensor(2.0))) == 1.0


def test_ema_decay_and_update():
    assert float(ema_decay(torch.tensor(0))) == pytest.approx(0.1)
    assert float(ema_decay(torch.tensor(90))) == pytest.approx(91 / 100)
    assert float(ema_decay(torch.tensor(10**7))) == pytest.approx(0.9999)
    torch.manual_seed(0)
    state, step = _setup(Tiny().train(), sgd(0.9))
    new_state, _ = step(state, _batch())
    w0, w1 = state["ema"]["params"]["m"]["fc.weight"], new_state["params"]["m"]["fc.weight"]
    torch.testing.assert_close(new_state["ema"]["params"]["m"]["fc.weight"], 0.1 * w0 + 0.9 * w1)
    nbt = new_state["ema"]["buffers"]["m"]["bn.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and int(nbt) == 1


def test_fp16_scaler_skips_non_finite_step_and_backs_off():
    torch.manual_seed(0)
    amp = AmpConfig(dtype="fp16", grad_scaler_init_scale=1024.0, growth_interval=2)
    # An infinite input makes the loss and the gradient non-finite: the step must be skipped.
    model = Tiny().train()
    _, scaled_step = _setup(model, sgd(0.9), amp=amp)
    state, _ = _setup(model, sgd(0.9), amp=amp)
    assert float(state["scaler"]["scale"]) == 1024.0
    bad = _batch()
    bad["x"] = bad["x"].clone()
    bad["x"][0, 0, 0, 0] = float("inf")
    new_state, metrics = scaled_step(state, bad)
    assert float(metrics["skipped"]) == 1.0
    assert float(new_state["scaler"]["scale"]) == 512.0
    for k, v in T.flatten(state["params"]).items():
        assert torch.equal(T.flatten(new_state["params"])[k], v)
    good1, _ = scaled_step(new_state, _batch(1))
    good2, m2 = scaled_step(good1, _batch(2))
    assert float(m2["skipped"]) == 0.0
    assert float(good2["scaler"]["scale"]) == 1024.0  # doubled after growth_interval=2 finite steps


def test_frozen_part_and_two_trainable_parts():
    torch.manual_seed(0)
    student, teacher = Tiny().train(), Tiny().eval()
    head = nn.Linear(6, 4)
    params = {"student": dict(student.named_parameters()), "head": dict(head.named_parameters())}
    buffers = {"student": dict(student.named_buffers()), "head": {}}
    frozen = {"teacher": {"params": dict(teacher.named_parameters()), "buffers": dict(teacher.named_buffers())}}

    def loss_fn(p, b, fz, batch, step):
        logits, feats, nb = apply_model(student, p["student"], b["student"], batch["x"], train=True)
        t_logits, t_feats, _ = apply_model(teacher, fz["teacher"]["params"], fz["teacher"]["buffers"], batch["x"], train=False)
        proj = torch.func.functional_call(head, p["head"], (feats["pooled"],))
        loss = F.cross_entropy(logits, batch["y_a"]) + (proj - t_feats["pooled"][:, :4]).pow(2).mean()
        return loss, ({"student": nb, "head": {}}, {})

    optimizer = sgd(0.9)
    state = init_state(params, buffers, optimizer, frozen=frozen)
    step = make_train_step(loss_fn, optimizer, lambda s: torch.tensor(0.1))
    new_state, _ = step(state, _batch())
    assert not torch.equal(new_state["params"]["head"]["weight"], state["params"]["head"]["weight"])
    assert not torch.equal(new_state["params"]["student"]["conv.weight"], state["params"]["student"]["conv.weight"])
    for k, v in T.flatten(state["frozen"]).items():
        assert torch.equal(T.flatten(new_state["frozen"])[k], v)


@pytest.mark.slow
def test_compiled_step_equals_eager():
    torch.manual_seed(0)
    model = Tiny(dropout=0.0).train()
    state, step = _setup(model, adamw(weight_decay=0.01), clip=1.0)
    compiled = compile_step(step, True)
    eager_state, compiled_state = state, T.clone(state)
    for i in range(3):
        eager_state, em = step(eager_state, _batch(i))
        compiled_state, cm = compiled(compiled_state, _batch(i))
        torch.testing.assert_close(cm["loss"], em["loss"], atol=1e-5, rtol=0)
    flat_e, flat_c = T.flatten(eager_state), T.flatten(compiled_state)
    for k in flat_e:
        torch.testing.assert_close(flat_c[k], flat_e[k], atol=1e-5, rtol=1e-5, msg=k)
