"""Fused information-bottleneck (IB) losses: Triton kernels beside their reference (SPEC 6, 8).

Reads top to bottom: the math, the ``@triton.jit`` kernels, the launchers, the autograd.Functions,
the public functions. The reference lives in :mod:`kernels.reference` (same names, no ``backend``).

Stage A: reparameterisation + KL (one row-wise kernel each way)
---------------------------------------------------------------
    z[n,d]  = mu + eps * exp(logvar / 2)
    kl[n]   = sum_d -1/2 (1 + logvar - mu^2 - exp(logvar))
    backward, with upstream gradients gz (N, Z) and gk (N,):
    dmu     = gz + gk * mu
    dlogvar = gz * eps * exp(logvar / 2) / 2 + gk * (exp(logvar) - 1) / 2
``eps`` is noise and gets no gradient. Either upstream gradient may be absent (an unused output).

Stage B: the student's four loss terms (one program per row, the whole row in registers)
--------------------------------------------------------------------------------------
Per row n, with latent rows z = z_s, mu, logvar (length Z) and logit rows s = student,
t = synergy (length K), temperature T, mixing weight lam and label smoothing e:

    P        = min(1 / (exp(logvar) + 1e-6), precision_max)          (a target: no gradient)
    mu_hat   = mu / max(|mu|, 1e-12)
    mse_n    = sum_d P (z - mu_hat)^2                 d/dz = 2 P (z - mu_hat)
    cos_n    = z.mu / (max(|z|, 1e-8) max(|mu|, 1e-8))
             d/dz = mu / (zc muc) - cos z / (|z| zc)   (zc, muc the clamped norms; the second term
                                                        vanishes while the clamp holds)
    kd_n     = T^2 sum_k pt_k (log pt_k - log ps_k),  pt = softmax(t/T), ps = softmax(s/T)
             d/ds = T (ps - pt)                         (uses sum_k pt_k = 1)
    ce_n     = lam CE_e(s, a) + (1 - lam) CE_e(s, b)
             CE_e(s, y) = (1 - e)(-log p_y) + e/K sum_k -log p_k,  p = softmax(s)
             d/ds = p - lam q_a - (1 - lam) q_b,   q_y = (1 - e) onehot(y) + e/K
    mse = mean_n mse_n,  ang = 1 - mean_n cos_n,  kd = mean_n kd_n,  ce = mean_n ce_n

Each row writes its four partials already divided by N (so ``ang``'s partial is (1 - cos_n)/N);
one ``sum`` over rows gives the batch means without a host sync and deterministically (no atomics).
That sum is not part of the op: the op returns the (N, 4) partials and :func:`ib_student_loss` sums
them with a torch op, so under ``torch.compile`` Inductor fuses the sum into the kernel that combines
the four terms into the loss (which the caller's graph has anyway), and the op is exactly one Triton
launch each way. The backward takes the partials' upstream gradient through its strides (the sum's
gradient is a stride-0 broadcast of the terms' gradients; nothing is materialised).

Why the backward recomputes instead of storing per-term gradients: storing d(mse)/dz, d(ang)/dz,
d(kd)/ds and d(ce)/ds in the forward would write 2NZ + 2NK extra values and read them back, and
keep them alive between forward and backward; the backward that recomputes reads the inputs again
(3NZ + 2NK) with per-row statistics saved by the forward (6 numbers per row: two norms, the
cosine, three log-sum-exps), writes only d z_s and d logits, and combines the four upstream gradients
(``loss = a*ce + b*kd + c*(0.7*mse + 0.3*ang)/Z``) for free. Forward-only calls pay nothing extra.

Accumulation is fp32 for fp32/bf16/fp16 inputs (fp64 for fp64), gradients come back in the input
dtype. ``lam``, ``temperature`` and ``precision_max`` are 0-d device tensors read inside the kernels,
so a new value each step neither recompiles nor syncs. ``precision_clamp_value`` has no kernel: a
``topk`` of the upper 1% is already one small op, and it is shared with the reference.

Composition: as in :mod:`kernels.at` (dispatcher ops + autograd.Function; inside
``torch.compile(torch.func.grad(...))`` ``auto`` uses the reference, pytorch/pytorch#193279).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._dispatch import count_launch, launch, resolve_backend, tl, triton
from .reference import COSINE_EPS, NORMALIZE_EPS, PRECISION_EPS, accumulation_dtype, precision_clamp_value

__all__ = ["ib_reparam_kl", "precision_clamp_value", "ib_student_loss"]

# Rows longer than this do not fit one program's registers; such sizes use the reference (auto)
# or are refused (backend="triton").
MAX_ROW_TRITON = 8192  # sm_90 compile (python -m kernels aot-check): 16384 spills, 8192 does not
_STATS = 6  # per-row statistics the stage-B forward saves for its backward


# ----------------------------------------------------------------------------------------------
# Triton kernels: stage A
# ----------------------------------------------------------------------------------------------


@triton.jit
def _reparam_kl_forward_kernel(
    mu_ptr,
    logvar_ptr,
    eps_ptr,
    z_ptr,  # (N, Z) out, mu's dtype, contiguous
    kl_ptr,  # (N,) out, ACC
    latent_dim,
    mu_stride,
    logvar_stride,
    eps_stride,
    ACC: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_Z)
    kl = tl.zeros([BLOCK_Z], dtype=ACC)
    for start in range(0, latent_dim, BLOCK_Z):
        dims = start + offsets
        mask = dims < latent_dim
        mu = tl.load(mu_ptr + row * mu_stride + dims, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + row * logvar_stride + dims, mask=mask, other=0.0).to(ACC)
        noise = tl.load(eps_ptr + row * eps_stride + dims, mask=mask, other=0.0).to(ACC)
        z = mu + noise * tl.exp(0.5 * logvar)
        tl.store(z_ptr + row * latent_dim + dims, z.to(z_ptr.dtype.element_ty), mask=mask)
        # masked lanes: mu = logvar = 0 give 1 + 0 - 0 - 1 = 0, no where() needed
        kl += -0.5 * (1.0 + logvar - mu * mu - tl.exp(logvar))
    tl.store(kl_ptr + row, tl.sum(kl, axis=0))


@triton.jit
def _reparam_kl_backward_kernel(
    mu_ptr,
    logvar_ptr,
    eps_ptr,
    grad_z_ptr,  # (N, Z) contiguous, or unused when HAS_GRAD_Z is False
    grad_kl_ptr,  # (N,) contiguous, or unused when HAS_GRAD_KL is False
    grad_mu_ptr,  # (N, Z) out, contiguous
    grad_logvar_ptr,  # (N, Z) out, contiguous
    latent_dim,
    mu_stride,
    logvar_stride,
    eps_stride,
    HAS_GRAD_Z: tl.constexpr,
    HAS_GRAD_KL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_Z: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1) * BLOCK_Z + tl.arange(0, BLOCK_Z)
    mask = dims < latent_dim
    mu = tl.load(mu_ptr + row * mu_stride + dims, mask=mask, other=0.0).to(ACC)
    logvar = tl.load(logvar_ptr + row * logvar_stride + dims, mask=mask, other=0.0).to(ACC)
    grad_mu = tl.zeros([BLOCK_Z], dtype=ACC)
    grad_logvar = tl.zeros([BLOCK_Z], dtype=ACC)
    if HAS_GRAD_Z:
        grad_z = tl.load(grad_z_ptr + row * latent_dim + dims, mask=mask, other=0.0).to(ACC)
        noise = tl.load(eps_ptr + row * eps_stride + dims, mask=mask, other=0.0).to(ACC)
        grad_mu += grad_z
        grad_logvar += grad_z * noise * 0.5 * tl.exp(0.5 * logvar)
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + row).to(ACC)
        grad_mu += grad_kl * mu
        grad_logvar += grad_kl * 0.5 * (tl.exp(logvar) - 1.0)
    tl.store(grad_mu_ptr + row * latent_dim + dims, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_logvar_ptr + row * latent_dim + dims, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Triton kernels: stage B
# ----------------------------------------------------------------------------------------------


@triton.jit
def _student_loss_forward_kernel(
    z_ptr,
    mu_ptr,
    logvar_ptr,
    precision_max_ptr,  # 0-d
    student_ptr,
    synergy_ptr,
    target_a_ptr,
    target_b_ptr,
    lam_ptr,  # 0-d
    temperature_ptr,  # 0-d
    partials_ptr,  # (N, 4) ACC out: (mse_n, 1 - cos_n, kd_n, ce_n) / N
    stats_ptr,  # (N, 6) ACC out, for the backward
    latent_dim,
    classes,
    z_stride,
    mu_stride,
    logvar_stride,
    student_stride,
    synergy_stride,
    inv_rows,  # 1 / N
    label_smoothing,
    precision_eps,
    normalize_eps,
    cosine_eps,
    ACC: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # --- latent terms ------------------------------------------------------------------------
    dims = tl.arange(0, BLOCK_Z)
    dim_mask = dims < latent_dim
    z = tl.load(z_ptr + row * z_stride + dims, mask=dim_mask, other=0.0).to(ACC)
    mu = tl.load(mu_ptr + row * mu_stride + dims, mask=dim_mask, other=0.0).to(ACC)
    logvar = tl.load(logvar_ptr + row * logvar_stride + dims, mask=dim_mask, other=0.0).to(ACC)
    precision_max = tl.load(precision_max_ptr).to(ACC)
    precision = tl.minimum(1.0 / (tl.exp(logvar) + precision_eps), precision_max)
    mu_norm = tl.sqrt(tl.sum(mu * mu, axis=0))
    z_norm = tl.sqrt(tl.sum(z * z, axis=0))
    mu_hat = mu / tl.maximum(mu_norm, normalize_eps)
    error = tl.where(dim_mask, z - mu_hat, 0.0)
    mse = tl.sum(precision * error * error, axis=0)
    cosine = tl.sum(z * mu, axis=0) / (tl.maximum(z_norm, cosine_eps) * tl.maximum(mu_norm, cosine_eps))
    # --- logit terms ------------------------------------------------------------------------
    ks = tl.arange(0, BLOCK_K)
    class_mask = ks < classes
    temperature = tl.load(temperature_ptr).to(ACC)
    lam = tl.load(lam_ptr).to(ACC)
    student = tl.load(student_ptr + row * student_stride + ks, mask=class_mask, other=0.0).to(ACC)
    synergy = tl.load(synergy_ptr + row * synergy_stride + ks, mask=class_mask, other=0.0).to(ACC)
    # log-sum-exp of student/T, synergy/T and student (T = 1); padded lanes contribute exp(-inf) = 0
    student_t = tl.where(class_mask, student / temperature, float("-inf"))
    synergy_t = tl.where(class_mask, synergy / temperature, float("-inf"))
    student_1 = tl.where(class_mask, student, float("-inf"))
    max_st = tl.max(student_t, axis=0)
    max_tt = tl.max(synergy_t, axis=0)
    max_s1 = tl.max(student_1, axis=0)
    lse_st = max_st + tl.log(tl.sum(tl.exp(student_t - max_st), axis=0))
    lse_tt = max_tt + tl.log(tl.sum(tl.exp(synergy_t - max_tt), axis=0))
    lse_s1 = max_s1 + tl.log(tl.sum(tl.exp(student_1 - max_s1), axis=0))
    log_p_student_t = student / temperature - lse_st
    log_p_synergy_t = synergy / temperature - lse_tt
    log_p_student = student - lse_s1
    p_synergy_t = tl.exp(log_p_synergy_t)
    kd = temperature * temperature * tl.sum(tl.where(class_mask, p_synergy_t * (log_p_synergy_t - log_p_student_t), 0.0), axis=0)
    target_a = tl.load(target_a_ptr + row)
    target_b = tl.load(target_b_ptr + row)
    nll_a = -tl.sum(tl.where(ks == target_a, log_p_student, 0.0), axis=0)
    nll_b = -tl.sum(tl.where(ks == target_b, log_p_student, 0.0), axis=0)
    uniform = -tl.sum(tl.where(class_mask, log_p_student, 0.0), axis=0) / classes
    ce_a = (1.0 - label_smoothing) * nll_a + label_smoothing * uniform
    ce_b = (1.0 - label_smoothing) * nll_b + label_smoothing * uniform
    ce = lam * ce_a + (1.0 - lam) * ce_b
    # --- outputs -------------------------------------------------------------------------------
    partials = partials_ptr + row * 4
    tl.store(partials + 0, mse * inv_rows)
    tl.store(partials + 1, (1.0 - cosine) * inv_rows)
    tl.store(partials + 2, kd * inv_rows)
    tl.store(partials + 3, ce * inv_rows)
    stats = stats_ptr + row * 6
    tl.store(stats + 0, mu_norm)
    tl.store(stats + 1, z_norm)
    tl.store(stats + 2, cosine)
    tl.store(stats + 3, lse_st)
    tl.store(stats + 4, lse_tt)
    tl.store(stats + 5, lse_s1)


@triton.jit
def _student_loss_backward_kernel(
    z_ptr,
    mu_ptr,
    logvar_ptr,
    precision_max_ptr,
    student_ptr,
    synergy_ptr,
    target_a_ptr,
    target_b_ptr,
    lam_ptr,
    temperature_ptr,
    stats_ptr,  # (N, 6) from the forward
    grad_partials_ptr,  # (N, 4) upstream gradients of the partials, any strides (usually (0, 1))
    grad_z_ptr,  # (N, Z) out, z_s's dtype, contiguous
    grad_student_ptr,  # (N, K) out, student's dtype, contiguous
    latent_dim,
    classes,
    z_stride,
    mu_stride,
    logvar_stride,
    student_stride,
    synergy_stride,
    grad_row_stride,
    grad_term_stride,
    inv_rows,
    label_smoothing,
    precision_eps,
    normalize_eps,
    cosine_eps,
    ACC: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    stats = stats_ptr + row * 6
    mu_norm = tl.load(stats + 0)
    z_norm = tl.load(stats + 1)
    cosine = tl.load(stats + 2)
    lse_st = tl.load(stats + 3)
    lse_tt = tl.load(stats + 4)
    lse_s1 = tl.load(stats + 5)
    grad_row = grad_partials_ptr + row * grad_row_stride
    grad_mse = tl.load(grad_row).to(ACC) * inv_rows
    grad_ang = tl.load(grad_row + grad_term_stride).to(ACC) * inv_rows
    grad_kd = tl.load(grad_row + 2 * grad_term_stride).to(ACC) * inv_rows
    grad_ce = tl.load(grad_row + 3 * grad_term_stride).to(ACC) * inv_rows
    # --- d z_s ----------------------------------------------------------------------------------
    dims = tl.arange(0, BLOCK_Z)
    dim_mask = dims < latent_dim
    z = tl.load(z_ptr + row * z_stride + dims, mask=dim_mask, other=0.0).to(ACC)
    mu = tl.load(mu_ptr + row * mu_stride + dims, mask=dim_mask, other=0.0).to(ACC)
    logvar = tl.load(logvar_ptr + row * logvar_stride + dims, mask=dim_mask, other=0.0).to(ACC)
    precision_max = tl.load(precision_max_ptr).to(ACC)
    precision = tl.minimum(1.0 / (tl.exp(logvar) + precision_eps), precision_max)
    mu_hat = mu / tl.maximum(mu_norm, normalize_eps)
    z_clamped = tl.maximum(z_norm, cosine_eps)
    mu_clamped = tl.maximum(mu_norm, cosine_eps)
    cosine_z_coefficient = tl.where(z_norm > cosine_eps, cosine / (z_norm * z_clamped), 0.0)
    grad_cosine = mu / (z_clamped * mu_clamped) - cosine_z_coefficient * z
    # ang = 1 - mean cos, so its gradient is minus the cosine's
    grad_z = grad_mse * 2.0 * precision * (z - mu_hat) - grad_ang * grad_cosine
    tl.store(grad_z_ptr + row * latent_dim + dims, grad_z.to(grad_z_ptr.dtype.element_ty), mask=dim_mask)
    # --- d student logits -----------------------------------------------------------------------
    ks = tl.arange(0, BLOCK_K)
    class_mask = ks < classes
    temperature = tl.load(temperature_ptr).to(ACC)
    lam = tl.load(lam_ptr).to(ACC)
    student = tl.load(student_ptr + row * student_stride + ks, mask=class_mask, other=0.0).to(ACC)
    synergy = tl.load(synergy_ptr + row * synergy_stride + ks, mask=class_mask, other=0.0).to(ACC)
    p_student_t = tl.exp(student / temperature - lse_st)
    p_synergy_t = tl.exp(synergy / temperature - lse_tt)
    p_student = tl.exp(student - lse_s1)
    target_a = tl.load(target_a_ptr + row)
    target_b = tl.load(target_b_ptr + row)
    # q_y = (1 - e) onehot(y) + e/K, mixed: lam q_a + (1 - lam) q_b. Built from ACC vectors: a where()
    # on two Python scalars would be fp32, and `classes` may arrive as a constexpr (Triton
    # specialises ints equal to 1), which has no .to().
    one_hot_a = (ks == target_a).to(ACC)
    one_hot_b = (ks == target_b).to(ACC)
    uniform_mass = (one_hot_a * 0.0 + label_smoothing) / classes
    target_mass = (1.0 - label_smoothing) * (lam * one_hot_a + (1.0 - lam) * one_hot_b) + uniform_mass
    grad_student = grad_kd * temperature * (p_student_t - p_synergy_t) + grad_ce * (p_student - target_mass)
    tl.store(grad_student_ptr + row * classes + ks, grad_student.to(grad_student_ptr.dtype.element_ty), mask=class_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _acc_dtype_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _row_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _reparam_kl_forward(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    count_launch("ib_reparam_kl_forward")
    rows, latent_dim = mu.shape
    acc = accumulation_dtype(mu, logvar)
    z = torch.empty((rows, latent_dim), device=mu.device, dtype=mu.dtype)
    kl = torch.empty((rows,), device=mu.device, dtype=acc)
    block = min(triton.next_power_of_2(latent_dim), 4096)
    launch(_reparam_kl_forward_kernel, (rows,),
        mu, logvar, eps, z, kl, latent_dim, mu.stride(0), logvar.stride(0), eps.stride(0),
        ACC=_acc_dtype_tl(acc), BLOCK_Z=block, num_warps=_row_warps(block),
    )  # fmt: skip
    return z, kl


def _reparam_kl_backward(mu, logvar, eps, grad_z, grad_kl) -> tuple[Tensor, Tensor]:
    count_launch("ib_reparam_kl_backward")
    rows, latent_dim = mu.shape
    grad_mu = torch.empty((rows, latent_dim), device=mu.device, dtype=mu.dtype)
    grad_logvar = torch.empty((rows, latent_dim), device=mu.device, dtype=logvar.dtype)
    grad_z = grad_z.contiguous() if grad_z is not None else None
    grad_kl = grad_kl.contiguous() if grad_kl is not None else None
    block = min(triton.next_power_of_2(latent_dim), 1024)
    launch(_reparam_kl_backward_kernel, (rows, triton.cdiv(latent_dim, block)),
        mu, logvar, eps,
        grad_z if grad_z is not None else mu,  # placeholder pointer, never read
        grad_kl if grad_kl is not None else mu,
        grad_mu, grad_logvar, latent_dim, mu.stride(0), logvar.stride(0), eps.stride(0),
        HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl is not None,
        ACC=_acc_dtype_tl(accumulation_dtype(mu, logvar)), BLOCK_Z=block,
    )  # fmt: skip
    return grad_mu, grad_logvar


def _row_major(t: Tensor) -> Tensor:
    """Rows may be strided (a slice of a wider batch); only the inner dimension must be dense."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _student_loss_forward(z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing):
    count_launch("ib_student_loss_forward")
    rows, latent_dim = z_s.shape
    classes = student_logits.shape[1]
    acc = accumulation_dtype(z_s, mu, student_logits, synergy_logits)
    partials = torch.empty((rows, 4), device=z_s.device, dtype=acc)
    stats = torch.empty((rows, _STATS), device=z_s.device, dtype=acc)
    block_z, block_k = triton.next_power_of_2(latent_dim), triton.next_power_of_2(classes)
    launch(_student_loss_forward_kernel, (rows,),
        z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature,
        partials, stats, latent_dim, classes,
        z_s.stride(0), mu.stride(0), logvar.stride(0), student_logits.stride(0), synergy_logits.stride(0),
        1.0 / rows, float(label_smoothing), PRECISION_EPS, NORMALIZE_EPS, COSINE_EPS,
        ACC=_acc_dtype_tl(acc), BLOCK_Z=block_z, BLOCK_K=block_k, num_warps=_row_warps(max(block_z, block_k)),
    )  # fmt: skip
    return partials, stats


def _student_loss_backward(
    grad_partials, stats, z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing
):
    count_launch("ib_student_loss_backward")
    rows, latent_dim = z_s.shape
    grad_partials = grad_partials.expand(rows, 4)  # a view: (4,) or (N, 4), read through its strides
    classes = student_logits.shape[1]
    grad_z = torch.empty((rows, latent_dim), device=z_s.device, dtype=z_s.dtype)
    grad_student = torch.empty((rows, classes), device=z_s.device, dtype=student_logits.dtype)
    block_z, block_k = triton.next_power_of_2(latent_dim), triton.next_power_of_2(classes)
    launch(_student_loss_backward_kernel, (rows,),
        z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature,
        stats, grad_partials, grad_z, grad_student, latent_dim, classes,
        z_s.stride(0), mu.stride(0), logvar.stride(0), student_logits.stride(0), synergy_logits.stride(0),
        grad_partials.stride(0), grad_partials.stride(1),
        1.0 / rows, float(label_smoothing), PRECISION_EPS, NORMALIZE_EPS, COSINE_EPS,
        ACC=_acc_dtype_tl(stats.dtype), BLOCK_Z=block_z, BLOCK_K=block_k, num_warps=_row_warps(max(block_z, block_k)),
    )  # fmt: skip
    return grad_z, grad_student


# ----------------------------------------------------------------------------------------------
# Ops around the launchers, and the autograd.Functions (ctx-free forward + setup_context: the form
# torch.func and torch.compile accept)
# ----------------------------------------------------------------------------------------------
# As in kernels.at: each launcher is a plain (non-differentiable) dispatcher op with a fake
# implementation, so torch.compile traces it as one opaque op and torch.func's wrappers are removed
# by the dispatcher before a kernel sees a tensor; the autograd.Functions own differentiation.

_LIBRARY = torch.library.Library("asmb_kd", "FRAGMENT")
_LIBRARY.define("ib_reparam_kl_forward(Tensor mu, Tensor logvar, Tensor eps) -> (Tensor, Tensor)")
_LIBRARY.define(
    "ib_reparam_kl_backward(Tensor mu, Tensor logvar, Tensor eps, Tensor? grad_z, Tensor? grad_kl) -> (Tensor, Tensor)"
)
_STUDENT_ARGS = (
    "Tensor z_s, Tensor mu, Tensor logvar, Tensor precision_max, Tensor student_logits, Tensor synergy_logits, "
    "Tensor target_a, Tensor target_b, Tensor lam, Tensor temperature, float label_smoothing"
)
_LIBRARY.define(f"ib_student_loss_forward({_STUDENT_ARGS}) -> (Tensor, Tensor)")
_LIBRARY.define(f"ib_student_loss_backward(Tensor grad_partials, Tensor stats, {_STUDENT_ARGS}) -> (Tensor, Tensor)")
_LIBRARY.impl("ib_reparam_kl_forward", _reparam_kl_forward, "CompositeExplicitAutograd")
_LIBRARY.impl("ib_reparam_kl_backward", _reparam_kl_backward, "CompositeExplicitAutograd")
_LIBRARY.impl("ib_student_loss_forward", _student_loss_forward, "CompositeExplicitAutograd")
_LIBRARY.impl("ib_student_loss_backward", _student_loss_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("asmb_kd::ib_reparam_kl_forward", lib=_LIBRARY)
def _(mu, logvar, eps):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(
        (mu.shape[0],), dtype=accumulation_dtype(mu, logvar)
    )


@torch.library.register_fake("asmb_kd::ib_reparam_kl_backward", lib=_LIBRARY)
def _(mu, logvar, eps, grad_z, grad_kl):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(logvar, memory_format=torch.contiguous_format)


@torch.library.register_fake("asmb_kd::ib_student_loss_forward", lib=_LIBRARY)
def _(z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing):
    acc = accumulation_dtype(z_s, mu, student_logits, synergy_logits)
    return z_s.new_empty((z_s.shape[0], 4), dtype=acc), z_s.new_empty((z_s.shape[0], _STATS), dtype=acc)


@torch.library.register_fake("asmb_kd::ib_student_loss_backward", lib=_LIBRARY)
def _(grad_partials, stats, z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing):
    return (
        torch.empty_like(z_s, memory_format=torch.contiguous_format),
        torch.empty_like(student_logits, memory_format=torch.contiguous_format),
    )


class _ReparamKL(torch.autograd.Function):
    @staticmethod
    def forward(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ops.asmb_kd.ib_reparam_kl_forward(mu, logvar, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_kl: Tensor | None):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) or (grad_z is None and grad_kl is None):
            return None, None, None
        mu, logvar, eps = ctx.saved_tensors
        grad_mu, grad_logvar = torch.ops.asmb_kd.ib_reparam_kl_backward(mu, logvar, eps, grad_z, grad_kl)
        return grad_mu, grad_logvar, None


class _StudentLoss(torch.autograd.Function):
    """Returns ``(partials (N, 4), stats (N, 6))``; ``stats`` only carries row statistics to the backward."""

    @staticmethod
    def forward(z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing):
        return torch.ops.asmb_kd.ib_student_loss_forward(
            z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature, label_smoothing
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, label_smoothing = inputs
        _terms, stats = output
        ctx.save_for_backward(stats, *tensors)
        ctx.label_smoothing = label_smoothing
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero-filled (N, 6) gradient for stats: it arrives as None

    @staticmethod
    def backward(ctx, grad_partials: Tensor | None, _grad_stats: Tensor | None):
        needs_z, needs_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if grad_partials is None or not (needs_z or needs_logits):
            return (None,) * 11
        stats, *tensors = ctx.saved_tensors
        grad_z, grad_student = torch.ops.asmb_kd.ib_student_loss_backward(grad_partials, stats, *tensors, ctx.label_smoothing)
        return (grad_z if needs_z else None, None, None, None, grad_student if needs_logits else None) + (None,) * 6


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def ib_reparam_kl(mu: Tensor, logvar: Tensor, eps: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Stage A: ``z = mu + eps * exp(logvar/2)`` (N, Z) and ``kl = sum_d -1/2 (1 + logvar - mu^2 - e^logvar)`` (N,).

    ``kl`` is fp32 (fp64 for fp64 inputs); gradients reach mu and logvar from both outputs, never eps.
    ``logvar`` arrives already clamped by the caller.
    """
    if mu.dim() != 2 or mu.shape != logvar.shape or mu.shape != eps.shape:
        raise ValueError(
            f"ib_reparam_kl: mu, logvar and eps must share one (N, Z) shape; got "
            f"{tuple(mu.shape)}, {tuple(logvar.shape)}, {tuple(eps.shape)}"
        )
    if resolve_backend(backend, mu, logvar, eps) == "reference":
        return reference.ib_reparam_kl(mu, logvar, eps)
    return _ReparamKL.apply(_row_major(mu), _row_major(logvar), _row_major(eps.detach()))


def ib_student_loss(
    z_s: Tensor,
    mu: Tensor,
    logvar: Tensor,
    precision_max: Tensor,
    student_logits: Tensor,
    synergy_logits: Tensor,
    target_a: Tensor,
    target_b: Tensor,
    lam: Tensor,
    temperature: Tensor,
    *,
    label_smoothing: float = 0.0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage B's four loss terms ``(mse, ang, kd, ce)``, 0-d fp32 tensors (see the module doc).

    Gradients reach only ``z_s`` and ``student_logits``; mu, logvar, synergy_logits, precision_max
    (and lam, temperature) are targets. ``lam``, ``temperature`` and ``precision_max`` are 0-d
    tensors on the inputs' device.
    """
    rows, latent_dim = z_s.shape
    classes = student_logits.shape[1]
    if mu.shape != z_s.shape or logvar.shape != z_s.shape:
        raise ValueError(f"ib_student_loss: z_s, mu, logvar must share (N, Z); got {tuple(z_s.shape)}, {tuple(mu.shape)}, {tuple(logvar.shape)}")
    if student_logits.shape != (rows, classes) or synergy_logits.shape != (rows, classes):
        raise ValueError(f"ib_student_loss: logits must both be (N={rows}, K); got {tuple(student_logits.shape)}, {tuple(synergy_logits.shape)}")
    if target_a.shape != (rows,) or target_b.shape != (rows,):
        raise ValueError(f"ib_student_loss: targets must be (N={rows},); got {tuple(target_a.shape)}, {tuple(target_b.shape)}")
    if any(t.dim() != 0 for t in (precision_max, lam, temperature)):
        raise ValueError("ib_student_loss: precision_max, lam and temperature must be 0-d tensors")
    args = (z_s, mu, logvar, precision_max, student_logits, synergy_logits, target_a, target_b, lam, temperature)
    chosen = resolve_backend(backend, *args)
    if chosen == "triton" and max(latent_dim, classes) > MAX_ROW_TRITON:
        if backend == "triton":
            raise ValueError(f"ib_student_loss: the Triton kernel holds a row in registers, Z and K must be <= {MAX_ROW_TRITON}")
        chosen = "reference"
    if chosen == "reference":
        return reference.ib_student_loss(*args, label_smoothing=label_smoothing)
    partials, _stats = _StudentLoss.apply(
        _row_major(z_s), _row_major(mu.detach()), _row_major(logvar.detach()), precision_max.detach(),
        _row_major(student_logits), _row_major(synergy_logits.detach()),
        target_a.contiguous(), target_b.contiguous(), lam.detach(), temperature.detach(), float(label_smoothing),
    )  # fmt: skip
    mse, ang, kd, ce = partials.sum(0).unbind(0)  # a torch op: fused with the terms' combination when compiled
    return mse, ang, kd, ce
