"""Fused IB kernels (stage A reparam + KL, stage B student terms) vs their pure-torch reference.

CPU: Triton interpreter; GPU: compiled kernels. The reference is pinned by hand-written formulas on
tiny cases, so a wrong reference cannot make the kernel comparisons pass vacuously.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton chooses interpret-or-compile when it is imported, so this must precede any import of it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch.nn.functional as F

from kernels import KERNEL_LAUNCHES, ib, reference
from kernels._dispatch import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# fp64: the interpreter keeps Python-float kernel arguments (1/N, eps, label smoothing) in double; a
# GPU launch types them fp32, so there fp64 agrees with the fp64 reference to about 1e-8 relative.
FP64_RTOL = 1e-10 if DEVICE == "cpu" else 1e-6
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=FP64_RTOL, atol=1e-13 if DEVICE == "cpu" else 1e-9)}


@pytest.fixture(autouse=True)
def _triton_runnable():
    if DEVICE == "cpu" and not interpreting():
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
            "CPU; export TRITON_INTERPRET=1 (or set it in tests/conftest.py) for this test run"
        )


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _student_inputs(rows, latent_dim, classes, dtype=torch.float32, seed=0, clamp_quantile=0.5, lam=0.3, temperature=2.5):
    """One stage-B batch. z_s is unit-norm (the projection head's output), logvar clamped to [-6, 2]."""
    g = _generator(seed)
    z_s = F.normalize(torch.randn(rows, latent_dim, generator=g, dtype=torch.float64), dim=1)
    mu = torch.randn(rows, latent_dim, generator=g, dtype=torch.float64)
    logvar = (2.0 * torch.randn(rows, latent_dim, generator=g, dtype=torch.float64)).clamp(-6.0, 2.0)
    student = 3.0 * torch.randn(rows, classes, generator=g, dtype=torch.float64)
    synergy = 3.0 * torch.randn(rows, classes, generator=g, dtype=torch.float64)
    target_a = torch.randint(0, classes, (rows,), generator=g)
    target_b = torch.randint(0, classes, (rows,), generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    z_s, mu, logvar, student, synergy = (t.to(**to) for t in (z_s, mu, logvar, student, synergy))
    # A low quantile so the clamp is active on about half the entries.
    precision_max = reference.precision_clamp_value(logvar, clamp_quantile)
    return dict(
        z_s=z_s, mu=mu, logvar=logvar, precision_max=precision_max,
        student_logits=student, synergy_logits=synergy,
        target_a=target_a.to(DEVICE), target_b=target_b.to(DEVICE),
        lam=torch.tensor(lam, device=DEVICE), temperature=torch.tensor(temperature, device=DEVICE),
    )  # fmt: skip


def _student_terms_and_grads(loss_fn, inputs, grad_outputs, label_smoothing, **kwargs):
    """The four terms and the gradients of sum_i g_i * term_i w.r.t. every floating input."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    terms = loss_fn(**leaves, label_smoothing=label_smoothing, **kwargs)
    torch.autograd.backward(terms, [torch.tensor(g, dtype=t.dtype, device=t.device) for g, t in zip(grad_outputs, terms)])
    grads = {k: v.grad for k, v in leaves.items() if v.is_floating_point()}
    return torch.stack([t.detach() for t in terms]), grads


def _triton_student_loss(**kwargs):
    return ib.ib_student_loss(**kwargs, backend="triton")


# ----------------------------------------------------------------------------------------------
# The references against hand formulas
# ----------------------------------------------------------------------------------------------


def test_reference_student_loss_matches_hand_formula():
    inputs = _student_inputs(2, 3, 4, dtype=torch.float64, seed=11, clamp_quantile=0.6, lam=0.3, temperature=2.0)
    smoothing = 0.1
    cpu = {k: v.cpu() for k, v in inputs.items()}
    pmax = cpu["precision_max"].item()
    lam, temperature = cpu["lam"].item(), cpu["temperature"].item()  # 0.3 as the fp32 tensor holds it
    mse = ang = kd = ce = 0.0
    for n in range(2):
        z = cpu["z_s"][n].tolist()
        mu = cpu["mu"][n].tolist()
        logvar = cpu["logvar"][n].tolist()
        mu_norm = math.sqrt(sum(m * m for m in mu))
        z_norm = math.sqrt(sum(v * v for v in z))
        mse += sum(min(1 / (math.exp(lv) + 1e-6), pmax) * (v - m / mu_norm) ** 2 for v, m, lv in zip(z, mu, logvar))
        ang += 1 - sum(v * m for v, m in zip(z, mu)) / (z_norm * mu_norm)
        s = cpu["student_logits"][n].tolist()
        t = cpu["synergy_logits"][n].tolist()
        p_t = [math.exp(x / temperature) / sum(math.exp(y / temperature) for y in t) for x in t]
        p_s = [math.exp(x / temperature) / sum(math.exp(y / temperature) for y in s) for x in s]
        kd += temperature**2 * sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
        log_p = [x - math.log(sum(math.exp(y) for y in s)) for x in s]

        def smoothed_ce(y):
            return (1 - smoothing) * -log_p[y] + smoothing * sum(-lp for lp in log_p) / 4

        ce += lam * smoothed_ce(int(cpu["target_a"][n])) + (1 - lam) * smoothed_ce(int(cpu["target_b"][n]))
    expected = torch.tensor([mse / 2, ang / 2, kd / 2, ce / 2], dtype=torch.float64)
    got = torch.stack(reference.ib_student_loss(**cpu, label_smoothing=smoothing))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The clamp really acted in this case.
    assert (1 / (cpu["logvar"].exp() + 1e-6) > pmax).any()


def test_reference_ce_matches_torch_label_smoothing():
    inputs = _student_inputs(5, 4, 7, seed=2)
    *_, ce = reference.ib_student_loss(**inputs, label_smoothing=0.05)
    logits = inputs["student_logits"]
    expected = 0.3 * F.cross_entropy(logits, inputs["target_a"], label_smoothing=0.05) + 0.7 * F.cross_entropy(
        logits, inputs["target_b"], label_smoothing=0.05
    )
    torch.testing.assert_close(ce, expected)


def test_reference_reparam_kl_matches_hand_formula():
    g = _generator(4)
    mu, logvar, eps = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    z, kl = reference.ib_reparam_kl(mu, logvar, eps)
    for n in range(2):
        for d in range(3):
            assert z[n, d].item() == pytest.approx(mu[n, d].item() + eps[n, d].item() * math.exp(logvar[n, d].item() / 2), rel=1e-14)
        expected = sum(-0.5 * (1 + logvar[n, d].item() - mu[n, d].item() ** 2 - math.exp(logvar[n, d].item())) for d in range(3))
        assert kl[n].item() == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# precision_clamp_value
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (128, 512), (7, 1000), (33, 97)])
@pytest.mark.parametrize("q", [0.99, 0.5, 0.0, 1.0, 0.37, 0.999])
def test_precision_clamp_value_equals_torch_quantile(shape, q):
    logvar = (2.0 * torch.randn(shape, generator=_generator(shape[0] * 1000 + shape[1]))).clamp(-6, 2).to(DEVICE)
    expected = torch.quantile((1 / (torch.exp(logvar) + 1e-6)).float().flatten(), q)
    got = ib.precision_clamp_value(logvar, q)
    assert got.shape == () and got.dtype == torch.float32
    assert_quantile_equal(got, expected)


def test_precision_clamp_value_with_ties_and_half_inputs():
    logvar = torch.tensor([[-1.0, -1.0, 0.5, 0.5, 2.0, -6.0, -6.0, -6.0]] * 3, device=DEVICE)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        lv = logvar.to(dtype)
        expected = torch.quantile((1 / (torch.exp(lv) + 1e-6)).float().flatten(), 0.99)
        assert torch.equal(ib.precision_clamp_value(lv), expected)


def test_precision_clamp_value_has_no_gradient_and_default_q():
    logvar = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    value = ib.precision_clamp_value(logvar)
    assert not value.requires_grad
    assert_quantile_equal(value, torch.quantile((1 / (torch.exp(logvar.detach()) + 1e-6)).flatten(), 0.99))


def assert_quantile_equal(got, expected):
    """To the last bit on a CPU. On CUDA torch.quantile rounds its fp32 rank and interpolation differently
    (seen on an H200, torch 2.11: 97.18061 vs 97.18092 at 65,536 values), so within 1e-5 relative there:
    a clamp threshold, where that is immaterial."""
    if got.device.type == "cpu":
        assert torch.equal(got, expected), (got.item(), expected.item())
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Stage A: Triton vs reference
# ----------------------------------------------------------------------------------------------


def _reparam_inputs(rows, latent_dim, dtype, seed=0):
    g = _generator(seed)
    mu = torch.randn(rows, latent_dim, generator=g, dtype=torch.float64)
    logvar = (2 * torch.randn(rows, latent_dim, generator=g, dtype=torch.float64)).clamp(-6, 2)
    eps = torch.randn(rows, latent_dim, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (mu, logvar, eps)]


def _reparam_outputs_and_grads(loss_fn, mu, logvar, eps, use):
    mu, logvar = mu.detach().clone().requires_grad_(True), logvar.detach().clone().requires_grad_(True)
    eps = eps.detach().clone().requires_grad_(True)  # noise: must get no gradient
    z, kl = loss_fn(mu, logvar, eps)
    g = _generator(99)
    weight_z = torch.randn(z.shape, generator=g, dtype=torch.float64).to(z)
    weight_kl = torch.randn(kl.shape, generator=g, dtype=torch.float64).to(kl)
    total = 0.0
    if "z" in use:
        total = total + (weight_z * z).sum()
    if "kl" in use:
        total = total + (weight_kl * kl).sum()
    total.backward()
    return z.detach(), kl.detach(), mu.grad, logvar.grad, eps.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(1, 5), (6, 37), (3, 512), (2, 4100)], ids=["N1", "odd", "z512", "multi-block"])
@pytest.mark.parametrize("use", [("z", "kl"), ("z",), ("kl",)], ids=["both", "z-only", "kl-only"])
def test_reparam_kl_triton_matches_reference(shape, dtype, use):
    inputs = _reparam_inputs(*shape, dtype)
    got = _reparam_outputs_and_grads(lambda *a: ib.ib_reparam_kl(*a, backend="triton"), *inputs, use)
    expected = _reparam_outputs_and_grads(reference.ib_reparam_kl, *inputs, use)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[1].shape == (shape[0],)
    for value, ref_value in zip(got[:4], expected[:4]):
        torch.testing.assert_close(value, ref_value, **TOLERANCE[dtype])
    assert got[4] is None and expected[4] is None  # eps gets no gradient


@pytest.mark.parametrize("loss_fn", [lambda *a: ib.ib_reparam_kl(*a, backend="triton"), reference.ib_reparam_kl], ids=["triton", "reference"])
def test_reparam_kl_gradcheck_fp64(loss_fn):
    mu, logvar, eps = _reparam_inputs(3, 5, torch.float64, seed=8)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, lv: loss_fn(m, lv, eps), (mu, logvar))


def test_reparam_kl_triton_under_func_grad_and_value():
    mu, logvar, eps = _reparam_inputs(4, 9, torch.float32, seed=3)
    beta = 1e-3

    def stage_a_loss(mu, logvar):
        z, kl = ib.ib_reparam_kl(mu, logvar, eps, backend="triton")
        return z.square().mean() + beta * kl.mean()

    (grad_mu, grad_logvar), value = torch.func.grad_and_value(stage_a_loss, argnums=(0, 1))(mu, logvar)
    mu_ref, logvar_ref = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
    z, kl = reference.ib_reparam_kl(mu_ref, logvar_ref, eps)
    ref_value = z.square().mean() + beta * kl.mean()
    ref_value.backward()
    torch.testing.assert_close(value, ref_value.detach(), **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad_mu, mu_ref.grad, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad_logvar, logvar_ref.grad, **TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------------------------
# Stage B: Triton vs reference
# ----------------------------------------------------------------------------------------------

STUDENT_SHAPES = {
    "N1": (1, 5, 3),
    "odd": (6, 37, 10),
    "cifar100-like": (4, 64, 100),
    "wide-latent": (3, 512, 7),
    "Z2-K2": (3, 2, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", list(STUDENT_SHAPES.values()), ids=list(STUDENT_SHAPES))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["ls0", "ls0.1"])
def test_student_loss_triton_matches_reference(shape, dtype, label_smoothing):
    inputs = _student_inputs(*shape, dtype=dtype, seed=sum(shape))
    precision = 1 / (inputs["logvar"].exp() + 1e-6)
    assert (precision > inputs["precision_max"]).any(), "the precision clamp must be active in this test"
    grad_outputs = (0.7 / shape[1], -0.3, 0.45, 1.3)  # each term its own upstream gradient
    terms, grads = _student_terms_and_grads(_triton_student_loss, inputs, grad_outputs, label_smoothing)
    ref_terms, ref_grads = _student_terms_and_grads(reference.ib_student_loss, inputs, grad_outputs, label_smoothing)
    assert terms.dtype == dtype  # fp32, or fp64 for fp64 inputs
    torch.testing.assert_close(terms, ref_terms, **TOLERANCE[dtype])
    torch.testing.assert_close(grads["z_s"], ref_grads["z_s"], **TOLERANCE[dtype])
    torch.testing.assert_close(grads["student_logits"], ref_grads["student_logits"], **TOLERANCE[dtype])
    assert grads["z_s"].dtype == dtype and grads["student_logits"].dtype == dtype
    for target in ("mu", "logvar", "precision_max", "synergy_logits", "lam", "temperature"):
        assert grads[target] is None, f"{target} is a target and must get no gradient"
        assert ref_grads[target] is None, f"reference: {target} is a target and must get no gradient"


@pytest.mark.parametrize("term", range(4), ids=["mse", "ang", "kd", "ce"])
def test_student_loss_each_term_alone(term):
    """Only one output used: the others' gradients are absent (None / zeros) in the backward."""
    inputs = _student_inputs(5, 12, 9, seed=21)
    grad_outputs = tuple(2.0 if i == term else 0.0 for i in range(4))
    _, grads = _student_terms_and_grads(_triton_student_loss, inputs, grad_outputs, 0.05)
    _, ref_grads = _student_terms_and_grads(reference.ib_student_loss, inputs, grad_outputs, 0.05)

    leaves = {k: (v.detach().clone().requires_grad_(True) if k in ("z_s", "student_logits") else v) for k, v in inputs.items()}
    only = ib.ib_student_loss(**leaves, label_smoothing=0.05, backend="triton")[term]
    z_grad, logit_grad = torch.autograd.grad(2.0 * only, [leaves["z_s"], leaves["student_logits"]], allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(z_grad, ref_grads["z_s"], **TOLERANCE[torch.float32])
    torch.testing.assert_close(logit_grad, ref_grads["student_logits"], **TOLERANCE[torch.float32])
    torch.testing.assert_close(grads["z_s"], ref_grads["z_s"], **TOLERANCE[torch.float32])


def test_student_loss_is_one_launch_each_way():
    """The op is one Triton launch forward and one backward; the row partials' sum is a torch op outside it
    (fused by Inductor under torch.compile), and each upstream gradient still reaches its own term."""
    inputs = _student_inputs(5, 9, 7, seed=4)
    grad_outputs = [0.3, -1.1, 2.0, 0.7]
    before = KERNEL_LAUNCHES.copy()
    leaves = {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    terms = _triton_student_loss(**leaves, label_smoothing=0.1)
    middle = KERNEL_LAUNCHES.copy()
    torch.autograd.backward(terms, [torch.tensor(g, device=DEVICE) for g in grad_outputs])
    forward, backward = dict(middle - before), dict(KERNEL_LAUNCHES - middle)
    assert forward == {"_student_loss_forward_kernel": 1}
    assert backward == {"_student_loss_backward_kernel": 1}
    ref_terms, ref_grads = _student_terms_and_grads(reference.ib_student_loss, inputs, grad_outputs, 0.1)
    torch.testing.assert_close(torch.stack([t.detach() for t in terms]), ref_terms, **TOLERANCE[torch.float32])
    torch.testing.assert_close(leaves["z_s"].grad, ref_grads["z_s"], **TOLERANCE[torch.float32])
    torch.testing.assert_close(leaves["student_logits"].grad, ref_grads["student_logits"], **TOLERANCE[torch.float32])


def test_student_loss_lam_weighs_the_two_targets():
    inputs = _student_inputs(4, 8, 6, seed=5)
    for lam in (0.0, 0.3, 1.0):
        inputs["lam"] = torch.tensor(lam, device=DEVICE)
        *_, ce = ib.ib_student_loss(**inputs, label_smoothing=0.1, backend="triton")
        logits = inputs["student_logits"]
        expected = lam * F.cross_entropy(logits, inputs["target_a"], label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
            logits, inputs["target_b"], label_smoothing=0.1
        )
        torch.testing.assert_close(ce, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("loss_fn", [_triton_student_loss, reference.ib_student_loss], ids=["triton", "reference"])
def test_student_loss_gradcheck_fp64(loss_fn):
    inputs = _student_inputs(3, 4, 5, dtype=torch.float64, seed=13)
    z_s = inputs.pop("z_s").requires_grad_(True)
    student = inputs.pop("student_logits").requires_grad_(True)

    def terms(z_s, student_logits):
        return loss_fn(z_s=z_s, student_logits=student_logits, **inputs, label_smoothing=0.1)

    assert torch.autograd.gradcheck(terms, (z_s, student))


def test_student_loss_triton_under_func_grad_and_value():
    inputs = _student_inputs(6, 16, 10, seed=7)
    latent_dim = 16
    z_s, student = inputs.pop("z_s"), inputs.pop("student_logits")

    def total_loss(z_s, student_logits, backend):
        mse, ang, kd, ce = ib.ib_student_loss(z_s=z_s, student_logits=student_logits, **inputs, label_smoothing=0.05, backend=backend)
        return 1.0 * ce + 0.45 * kd + 0.8 * (0.7 * mse + 0.3 * ang) / latent_dim

    (grad_z, grad_logits), value = torch.func.grad_and_value(total_loss, argnums=(0, 1))(z_s, student, "triton")
    (ref_z, ref_logits), ref_value = torch.func.grad_and_value(total_loss, argnums=(0, 1))(z_s, student, "reference")
    torch.testing.assert_close(value, ref_value, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad_z, ref_z, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad_logits, ref_logits, **TOLERANCE[torch.float32])


def test_reference_under_compiled_func_grad_and_value_without_recompiles():
    """The reference (plus the quantile) in one compiled grad step; new lam/T/clamp do not recompile."""
    inputs = _student_inputs(8, 16, 10, seed=9)
    z_s, student = inputs.pop("z_s"), inputs.pop("student_logits")
    for name in ("precision_max",):
        inputs.pop(name)

    def total_loss(z_s, student_logits, mu, logvar, synergy_logits, target_a, target_b, lam, temperature):
        precision_max = ib.precision_clamp_value(logvar, 0.99)
        mse, ang, kd, ce = ib.ib_student_loss(
            z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing=0.05
        )
        return ce + 0.5 * kd + (0.7 * mse + 0.3 * ang) / 16

    step = torch.func.grad_and_value(total_loss, argnums=(0, 1))
    compiled = torch.compile(step, fullgraph=True)
    args = (z_s, student, inputs["mu"], inputs["logvar"], inputs["synergy_logits"], inputs["target_a"], inputs["target_b"])
    for lam, temperature in ((0.3, 6.0), (0.8, 2.5)):
        scalars = (torch.tensor(lam, device=DEVICE), torch.tensor(temperature, device=DEVICE))
        with torch._dynamo.config.patch(error_on_recompile=lam != 0.3):
            (grad_z, grad_logits), value = compiled(*args, *scalars)
        (ref_z, ref_logits), ref_value = step(*args, *scalars)
        torch.testing.assert_close(value, ref_value, **TOLERANCE[torch.float32])
        torch.testing.assert_close(grad_z, ref_z, **TOLERANCE[torch.float32])
        torch.testing.assert_close(grad_logits, ref_logits, **TOLERANCE[torch.float32])


def _stage_b_total(z_s, student_logits, mu, logvar, synergy_logits, target_a, target_b, lam, temperature, mbm_noise, backend):
    """Stage-B weighting as the recipe does it, plus the stage-A op on the same latent (both kernels)."""
    precision_max = ib.precision_clamp_value(logvar)
    mse, ang, kd, ce = ib.ib_student_loss(
        z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature,
        label_smoothing=0.05, backend=backend,
    )  # fmt: skip
    z_mbm, kl = ib.ib_reparam_kl(z_s, logvar, mbm_noise, backend=backend)
    latent_dim = z_s.shape[1]
    return ce + 0.5 * kd + (0.7 * mse + 0.3 * ang) / latent_dim + 1e-3 * kl.mean() + 1e-2 * z_mbm.square().mean()


def _autograd_step(z_s, student_logits, *args):
    """A compiled step that differentiates with torch.autograd.grad (keeps custom backwards). The leaves
    arrive requiring grad: torch 2.11 refuses requires_grad_() inside the graph."""
    leaves = [z_s, student_logits]
    with torch.enable_grad():
        total = _stage_b_total(*leaves, *args)
        grads = torch.autograd.grad(total, leaves)
    return grads, total.detach()


def test_triton_inside_torch_compile():
    """Both IB kernels as opaque ops inside one compiled step (the interpreter runs them on CPU)."""
    inputs = _student_inputs(6, 16, 10, seed=17)
    z_s, student = inputs.pop("z_s"), inputs.pop("student_logits")
    mbm_noise = torch.randn(z_s.shape, generator=_generator(5)).to(DEVICE)
    args = (inputs["mu"], inputs["logvar"], inputs["synergy_logits"], inputs["target_a"], inputs["target_b"], inputs["lam"], inputs["temperature"])
    (ref_z, ref_logits), ref_value = torch.func.grad_and_value(_stage_b_total, argnums=(0, 1))(z_s, student, *args, mbm_noise, "reference")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_autograd_step, fullgraph=True)
        z_leaf, student_leaf = z_s.detach().clone().requires_grad_(True), student.detach().clone().requires_grad_(True)
        (grad_z, grad_logits), value = compiled(z_leaf, student_leaf, *args, mbm_noise, "triton")
        torch.testing.assert_close(value, ref_value, **TOLERANCE[torch.float32])
        torch.testing.assert_close(grad_z, ref_z, **TOLERANCE[torch.float32])
        torch.testing.assert_close(grad_logits, ref_logits, **TOLERANCE[torch.float32])
        # New per-step scalars do not recompile.
        new_scalars = (torch.tensor(0.9, device=DEVICE), torch.tensor(1.5, device=DEVICE))
        with torch._dynamo.config.patch(error_on_recompile=True):
            _, value = compiled(z_leaf, student_leaf, *args[:5], *new_scalars, mbm_noise, "triton")
    expected = _stage_b_total(z_s, student, *args[:5], *new_scalars, mbm_noise, "reference")
    torch.testing.assert_close(value, expected, **TOLERANCE[torch.float32])


def test_triton_refuses_compiled_func_grad():
    """torch 2.14.1 drops custom backwards in compile(func.grad) (pytorch#193279): fail loudly, not wrongly."""
    inputs = _student_inputs(4, 8, 5, seed=2)
    z_s, student = inputs.pop("z_s"), inputs.pop("student_logits")
    mbm_noise = torch.zeros_like(z_s)
    args = (inputs["mu"], inputs["logvar"], inputs["synergy_logits"], inputs["target_a"], inputs["target_b"], inputs["lam"], inputs["temperature"])
    with pytest.raises(Exception, match="193279"):
        torch.compile(torch.func.grad(_stage_b_total, argnums=(0, 1)), fullgraph=True)(z_s, student, *args, mbm_noise, "triton")


def test_student_loss_validates_shapes():
    inputs = _student_inputs(3, 4, 5)
    bad = dict(inputs, target_b=inputs["target_b"][:2])
    with pytest.raises(ValueError, match="targets"):
        ib.ib_student_loss(**bad, backend="triton")
    bad = dict(inputs, lam=torch.tensor([0.3]))
    with pytest.raises(ValueError, match="0-d"):
        ib.ib_student_loss(**bad, backend="reference")


# ----------------------------------------------------------------------------------------------
# GPU only: half precision (the interpreter mis-computes bf16) and the compiled Triton path
# ----------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(128, 512, 100), (256, 1024, 1000), (7, 37, 10)], ids=["n128", "imagenet", "odd"])
def test_student_loss_half_precision(dtype, shape):
    inputs = _student_inputs(*shape, dtype=dtype, seed=1)
    grad_outputs = (0.7 / shape[1], 0.3 / shape[1], 0.45, 1.0)
    terms, grads = _student_terms_and_grads(_triton_student_loss, inputs, grad_outputs, 0.05)
    ref_terms, ref_grads = _student_terms_and_grads(reference.ib_student_loss, inputs, grad_outputs, 0.05)
    assert terms.dtype == torch.float32 and grads["z_s"].dtype == dtype
    torch.testing.assert_close(terms, ref_terms, rtol=1e-4, atol=1e-5)
    for name in ("z_s", "student_logits"):
        scale = ref_grads[name].float().abs().max().item()
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), rtol=2e-2, atol=1e-2 * scale)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reparam_kl_half_precision(dtype):
    inputs = _reparam_inputs(256, 512, dtype)
    got = _reparam_outputs_and_grads(lambda *a: ib.ib_reparam_kl(*a, backend="triton"), *inputs, ("z", "kl"))
    expected = _reparam_outputs_and_grads(reference.ib_reparam_kl, *inputs, ("z", "kl"))
    assert got[1].dtype == torch.float32 and got[0].dtype == dtype
    for value, ref_value in zip(got[:4], expected[:4]):
        torch.testing.assert_close(value.float(), ref_value.float(), rtol=2e-2, atol=2e-2)


@gpu_only
@pytest.mark.gpu
def test_compiled_train_step_shapes_on_gpu():
    """N128 Z512 K100 on the GPU: compiled autograd.grad runs Triton; compiled func.grad (auto) stays correct."""
    inputs = _student_inputs(128, 512, 100, seed=3)
    z_s, student = inputs.pop("z_s"), inputs.pop("student_logits")
    mbm_noise = torch.randn_like(inputs["mu"])
    args = (inputs["mu"], inputs["logvar"], inputs["synergy_logits"], inputs["target_a"], inputs["target_b"], inputs["lam"], inputs["temperature"])
    (ref_z, ref_logits), ref_value = torch.func.grad_and_value(_stage_b_total, argnums=(0, 1))(z_s, student, *args, mbm_noise, "reference")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        leaves = (z_s.detach().clone().requires_grad_(True), student.detach().clone().requires_grad_(True))
        (grad_z, grad_logits), value = torch.compile(_autograd_step, fullgraph=True)(*leaves, *args, mbm_noise, "triton")
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_z, ref_z, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_logits, ref_logits, rtol=1e-4, atol=1e-7)
    step = torch.compile(torch.func.grad_and_value(_stage_b_total, argnums=(0, 1)), fullgraph=True)
    (grad_z, grad_logits), value = step(z_s, student, *args, mbm_noise, "auto")
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_z, ref_z, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_logits, ref_logits, rtol=1e-4, atol=1e-7)
