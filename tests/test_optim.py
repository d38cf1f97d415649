"""Pure optimizers match torch.optim step for step; schedules match their formulas."""

import math

import pytest
import torch

from kd.optim import OptimConfig, adamw, lr_schedule, multistep, sgd, warmup_cosine


def _random_tree(gen, dtype=torch.float32):
    return {"conv": {"weight": torch.randn(4, 3, 3, 3, generator=gen, dtype=dtype)},
            "fc": {"weight": torch.randn(5, 7, generator=gen, dtype=dtype), "bias": torch.randn(5, generator=gen, dtype=dtype)}}


def _leaves(tree):
    return [tree["conv"]["weight"], tree["fc"]["weight"], tree["fc"]["bias"]]


@pytest.mark.parametrize("name,kwargs,ref", [
    ("sgd", dict(momentum=0.0, weight_decay=0.0), dict(momentum=0.0, weight_decay=0.0)),
    ("sgd", dict(momentum=0.9, weight_decay=5e-4), dict(momentum=0.9, weight_decay=5e-4)),
    ("sgd", dict(momentum=0.9, weight_decay=5e-4, nesterov=True), dict(momentum=0.9, weight_decay=5e-4, nesterov=True)),
    ("adamw", dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4), dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=5e-4)),
    ("adamw", dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("adam", dict(weight_decay=5e-4, decoupled=False), dict(weight_decay=5e-4)),
])
def test_matches_torch_optim_for_20_steps(name, kwargs, ref):
    gen = torch.Generator().manual_seed(0)
    params = _random_tree(gen)
    torch_params = [p.clone().requires_grad_() for p in _leaves(params)]
    ours = sgd(**kwargs) if name == "sgd" else adamw(**kwargs)
    reference = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    theirs = reference(torch_params, lr=0.05, **ref)
    opt_state = ours.init(params)
    original = [p.clone() for p in _leaves(params)]
    for step in range(20):
        lr = 0.05 * (1 - step / 40)  # a changing lr, fed as a 0-d tensor
        grads = _random_tree(gen)
        params, opt_state = ours.update(grads, opt_state, params, torch.tensor(lr))
        for group in theirs.param_groups:
            group["lr"] = lr
        for p, g in zip(torch_params, _leaves(grads)):
            p.grad = g.clone()
        theirs.step()
    for mine, reference, start in zip(_leaves(params), torch_params, original):
        assert not torch.equal(mine, start)
        torch.testing.assert_close(mine, reference.detach(), rtol=0, atol=1e-6)


def test_update_is_pure():
    gen = torch.Generator().manual_seed(1)
    params = _random_tree(gen)
    before = [p.clone() for p in _leaves(params)]
    opt = adamw(weight_decay=0.1)
    state = opt.init(params)
    opt.update(_random_tree(gen), state, params, torch.tensor(0.1))
    for p, b in zip(_leaves(params), before):
        assert torch.equal(p, b)
    assert float(state["count"]) == 0


def test_warmup_cosine_formula():
    total, warm, base, floor = 100, 10, 0.1, 0.05
    for step in [0, 5, 9]:
        assert float(warmup_cosine(torch.tensor(step), total, warm, base, floor)) == pytest.approx(base * (step + 1) / warm)
    for step in [10, 40, 99]:
        progress = (step - warm) / (total - warm)
        want = base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(warmup_cosine(torch.tensor(step), total, warm, base, floor)) == pytest.approx(want, rel=1e-5)
    assert float(warmup_cosine(torch.tensor(total), total, warm, base, floor)) == pytest.approx(base * floor, rel=1e-5)


def test_multistep_and_config_schedule():
    lr = lambda s: float(multistep(torch.tensor(s), (150, 180, 210), 0.05, 0.1))  # noqa: E731
    assert lr(0) == pytest.approx(0.05) and lr(149) == pytest.approx(0.05)
    assert lr(150) == pytest.approx(0.005) and lr(185) == pytest.approx(0.0005) and lr(239) == pytest.approx(0.00005)
    cfg = OptimConfig(name="sgd", lr=0.05, schedule="multistep", milestones=(2, 3), warmup_epochs=0)
    schedule = lr_schedule(cfg, steps_per_epoch=10, epochs=4)
    assert float(schedule(torch.tensor(19))) == pytest.approx(0.05)
    assert float(schedule(torch.tensor(20))) == pytest.approx(0.005)
    assert float(schedule(torch.tensor(30))) == pytest.approx(0.0005)
