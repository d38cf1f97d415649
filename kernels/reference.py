"""Pure-torch references for the fused AT and IB losses.

This module is the single source of truth for the math (SPEC 6-8). The CPU path of the public
functions in :mod:`kernels` calls these functions, the tests compare the Triton kernels against
them, and the benchmark's ``eager`` / ``compile`` providers time them. They are written with plain
differentiable torch ops only (no custom autograd, no ``.item()``, no Python branch on a tensor
value), so they compose with ``torch.func.grad_and_value`` and ``torch.compile(fullgraph=True)``.

Naming: every function here has exactly the name and signature of the public function in
:mod:`kernels` (``kernels.at`` / ``kernels.ib``), minus the ``backend=`` keyword, which only the
dispatching public functions take.

Precision: fp32/bf16/fp16 inputs are accumulated in fp32 and the losses are fp32. fp64 inputs stay in
fp64 (one deliberate extension of SPEC 8's "``f.float()``") so that ``torch.autograd.gradcheck`` on
tiny fp64 shapes is meaningful; no training path feeds fp64.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "attention_map",
    "attention_transfer_loss",
    "attention_transfer_pair_loss",
    "ib_reparam_kl",
    "precision_clamp_value",
    "ib_student_loss",
    "distillation_kl",
    "mixed_cross_entropy",
    "PRECISION_EPS",
    "NORMALIZE_EPS",
    "COSINE_EPS",
]

# Constants of the IB latent terms (SPEC 6): shared with the Triton kernels so they cannot drift.
PRECISION_EPS = 1e-6  # P = 1 / (exp(logvar) + PRECISION_EPS)
NORMALIZE_EPS = 1e-12  # F.normalize's default eps (attention maps, mu_hat)
COSINE_EPS = 1e-8  # F.cosine_similarity's default eps


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (bf16/fp16/fp32 all accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------
# Attention transfer (Zagoruyko & Komodakis, p = 2)
# ----------------------------------------------------------------------------------------------


def attention_map(f: Tensor) -> Tensor:
    """``A(f) = normalize(flatten(mean_c f^2))``: (N, C, H, W) -> (N, H*W), unit L2 norm per sample."""
    energy = reduce(f.to(accumulation_dtype(f)).pow(2), "n c h w -> n (h w)", "mean")
    return F.normalize(energy, dim=1, eps=NORMALIZE_EPS)


def attention_transfer_pair_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """``mean_{n, positions} (A(pool(s)) - A(t))^2`` for one stage pair; the teacher is detached.

    When the spatial sizes differ the student map is adaptive-average-pooled to the teacher's H, W
    before its attention map is taken (pooling acts on features, not on the attention map).
    """
    teacher_hw = teacher_map.shape[-2:]
    if student_map.shape[-2:] != teacher_hw:
        student_map = F.adaptive_avg_pool2d(student_map, teacher_hw)
    student_attention = attention_map(student_map)  # (N, H*W)
    teacher_attention = attention_map(teacher_map.detach())  # (N, H*W)
    return (student_attention - teacher_attention).pow(2).mean()


def attention_transfer_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """``sum_i w_i * mean (A(s_i) - A(t_i))^2`` over stage pairs; a 0-d fp32 tensor (fp64 for fp64)."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(
            f"attention_transfer_loss: {len(student_maps)} student maps but "
            f"{len(teacher_maps)} teacher maps; pass one teacher map per student map"
        )
    if len(student_maps) == 0:
        raise ValueError("attention_transfer_loss: no stage pairs given")
    if weights is None:
        weights = [1.0] * len(student_maps)
    if len(weights) != len(student_maps):
        raise ValueError(
            f"attention_transfer_loss: {len(weights)} weights for {len(student_maps)} stage pairs"
        )
    total = None
    for student_map, teacher_map, weight in zip(student_maps, teacher_maps, weights):
        term = weight * attention_transfer_pair_loss(student_map, teacher_map)
        total = term if total is None else total + term
    return total


# ----------------------------------------------------------------------------------------------
# The two terms every method shares: temperature-scaled KD and cross-entropy on mixed targets.
# Defined once here; the IB kernel's reference below, kd.losses (Hinton, ensemble and DKD) and
# kd.step.mixed_cross_entropy all call these.
# ----------------------------------------------------------------------------------------------


def distillation_kl(student_logits: Tensor, teacher_log_probs: Tensor, temperature: Tensor | float) -> Tensor:
    """``T^2 * KL(p_teacher || softmax(student / T))``, summed over classes, batch mean (Hinton et al.).

    ``teacher_log_probs`` are the target's log-probabilities *at temperature T* (e.g.
    ``log_softmax(teacher / T)``, or the log of an average of several teachers' tempered softmaxes);
    they are constants. The ``T^2`` keeps the gradient's size independent of ``T``.
    """
    acc = accumulation_dtype(student_logits, teacher_log_probs)
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().to(acc)
    student_log_probs = F.log_softmax(student_logits.to(acc) / temperature, dim=1)
    teacher_log_probs = teacher_log_probs.detach().to(acc)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(1).mean()
    return kl * temperature**2


def _label_smoothed_cross_entropy(
    log_probs: Tensor, target: Tensor, label_smoothing: float
) -> Tensor:
    """Per-sample CE with PyTorch's label smoothing: ``(1-eps)*(-log p_y) + eps/K * sum_k -log p_k``."""
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    uniform = -log_probs.mean(1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def mixed_cross_entropy(
    logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor | float, label_smoothing: float = 0.0
) -> Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``, batch means (mixup / CutMix targets;
    ``y_b = y_a``, ``lam = 1`` when nothing is mixed), with PyTorch's label smoothing."""
    acc = accumulation_dtype(logits)
    log_probs = F.log_softmax(logits.to(acc), dim=1)
    ce_a = _label_smoothed_cross_entropy(log_probs, target_a, label_smoothing).mean()
    ce_b = _label_smoothed_cross_entropy(log_probs, target_b, label_smoothing).mean()
    if isinstance(lam, Tensor):
        lam = lam.detach().to(acc)
    return lam * ce_a + (1.0 - lam) * ce_b


# ----------------------------------------------------------------------------------------------
# Information bottleneck: stage A (MBM) and stage B (student) terms
# ----------------------------------------------------------------------------------------------


def ib_reparam_kl(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Reparameterised sample and per-sample KL to N(0, I).

    ``z = mu + eps * exp(logvar / 2)`` in mu's dtype, shape (N, Z);
    ``kl = sum_d -0.5 * (1 + logvar - mu^2 - exp(logvar))`` fp32 (fp64 for fp64), shape (N,).
    ``eps`` is noise: it gets no gradient.
    """
    acc = accumulation_dtype(mu, logvar)
    mu_acc = mu.to(acc)
    logvar_acc = logvar.to(acc)
    z = (mu_acc + eps.detach().to(acc) * torch.exp(0.5 * logvar_acc)).to(mu.dtype)
    kl = (-0.5 * (1.0 + logvar_acc - mu_acc.pow(2) - logvar_acc.exp())).sum(1)
    return z, kl


def _quantile_rank(q: float, count: int) -> float:
    """The rank ``torch.quantile`` interpolates at, reproduced bit for bit in pure Python.

    ``torch.quantile(x, q)`` (float q) turns q into a tensor of x's dtype (fp32 here), then computes
    ``rank = q * (count - 1)`` in double and the interpolation weight ``rank - floor(rank)`` in double,
    which ``lerp`` finally rounds to fp32. Matching that exactly needs the fp32 rounding of q first.
    """
    q_as_float32 = struct.unpack("f", struct.pack("f", q))[0]
    return q_as_float32 * float(count - 1)


def precision_clamp_value(logvar: Tensor, q: float = 0.99) -> Tensor:
    """``torch.quantile(P.flatten(), q)`` of the precision ``P = 1/(exp(logvar)+1e-6)``, no gradient.

    Equal to ``torch.quantile`` (linear interpolation) to the last bit on a CPU (on CUDA within 1e-5
    relative: torch's CUDA quantile rounds its rank and interpolation differently), without a sort of the whole
    batch and without a host sync: the rank ``q * (n - 1)`` depends only on the shape, so it is
    computed in Python exactly as ``torch.quantile`` computes it, and a ``topk`` of the upper tail
    (1% of the batch for q = 0.99) yields the two order statistics that are interpolated.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"precision_clamp_value: q must be in [0, 1], got {q}")
    precision = (1.0 / (torch.exp(logvar.detach()) + PRECISION_EPS)).float().flatten()
    count = precision.numel()
    if count == 0:
        raise ValueError("precision_clamp_value: logvar is empty")
    rank = _quantile_rank(q, count)  # position in the ascending order
    rank_below = int(rank)  # floor (rank >= 0)
    rank_above = min(rank_below + 1, count - 1) if rank > rank_below else rank_below
    # topk is descending: ascending index i is descending index (count - 1 - i).
    upper_tail = torch.topk(precision, count - rank_below, largest=True, sorted=True).values
    value_below = upper_tail[count - 1 - rank_below]
    value_above = upper_tail[count - 1 - rank_above]
    # A Python-float weight is rounded to fp32 by lerp, as torch.quantile's double weights are.
    return torch.lerp(value_below, value_above, rank - rank_below)


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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage-B loss terms ``(mse, ang, kd, ce)``, four 0-d fp32 tensors (SPEC 6).

    Gradients reach only ``z_s`` and ``student_logits``; mu, logvar, synergy_logits and
    precision_max are targets and are detached here.
    """
    acc = accumulation_dtype(z_s, mu, student_logits, synergy_logits)
    z_s_acc = z_s.to(acc)
    mu_acc = mu.detach().to(acc)
    logvar_acc = logvar.detach().to(acc)
    student = student_logits.to(acc)
    synergy = synergy_logits.detach().to(acc)
    temperature = temperature.detach().to(acc)
    lam = lam.detach().to(acc)

    # Latent alignment: precision-weighted squared error to the unit-norm mu, plus an angular term.
    precision = torch.minimum(
        1.0 / (torch.exp(logvar_acc) + PRECISION_EPS), precision_max.detach().to(acc)
    )
    mu_hat = F.normalize(mu_acc, dim=1, eps=NORMALIZE_EPS)
    mse = (precision * (z_s_acc - mu_hat).pow(2)).sum(1).mean()
    ang = 1.0 - F.cosine_similarity(z_s_acc, mu_acc, dim=1, eps=COSINE_EPS).mean()

    # KD: T^2 * KL(softmax(synergy/T) || softmax(student/T)), batch mean; CE on mixed targets.
    kd = distillation_kl(student, F.log_softmax(synergy / temperature, dim=1), temperature)
    ce = mixed_cross_entropy(student, target_a, target_b, lam, label_smoothing)
    return mse, ang, kd, ce
