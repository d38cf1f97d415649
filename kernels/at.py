"""Fused attention-transfer (AT) loss: Triton kernels beside their reference (SPEC 7, 8).

Reads top to bottom: the math, the ``@triton.jit`` kernels, the launchers, the autograd.Function,
the public functions. The reference lives in :mod:`kernels.reference` (same names, no ``backend``).

The math, for one stage pair
----------------------------
Student features ``s`` (N, Cs, Hs, Ws), teacher features ``t`` (N, Ct, H, W), ``P = H * W``.
When ``Hs = kh * H`` and ``Ws = kw * W`` (integer ratio) the adaptive average pool is a plain
``kh x kw`` box average and is fused; any other size mismatch is pooled by torch first (kh = kw = 1).

    x[n,c,p]  = 1/(kh kw) * sum_{(i,j) in window(p)} s[n,c,i,j]        pooled student features
    q_s[n,p]  = 1/Cs * sum_c x[n,c,p]^2                                 channel energy ("map")
    r_s[n]    = max(||q_s[n,:]||_2, eps),   a_s = q_s / r_s             F.normalize, eps = 1e-12
    (q_t, r_t, a_t the same for the teacher, without pooling)
    L         = 1/(N P) * sum_{n,p} (a_s - a_t)^2

The squared difference is taken elementwise on the normalised maps, never through the identity
``2 - 2 cos``: that identity is wrong for clamped (all-zero) maps and cancels catastrophically in
fp32 exactly when student and teacher agree, the regime late in training.

Backward (the teacher is a target: no gradient). With ``delta = a_s - a_t`` and an upstream
gradient ``g`` of L:

    dL/da_s[n,p] = g * 2/(N P) * delta[n,p]
    da_s[p']/dq_s[p] = (1[p = p'] - a_s[p] a_s[p']) / r_s             while ||q_s|| > eps
    => dL/dq_s[n,p] = g * 2/(N P) * u[n,p],
       u[n,p] = (delta[n,p] - m[n] * a_s[n,p] * gamma[n]) / r_s[n],  gamma[n] = sum_p a_s delta
       m[n] = 1 while ||q_s|| > eps; 0 when the clamp holds (r_s = eps is then a constant)
    dL/dx[n,c,p] = 2/Cs * x[n,c,p] * dL/dq_s[n,p]
    dL/ds[n,c,i,j] = dL/dx[n,c,p(i,j)] / (kh kw)        (every element of a window gets the same)

    => ds = g * 4/(N P Cs kh kw) * x[n,c,p] * u[n,p]

So the forward saves only ``u`` (N, P) fp32 (plus the student map it was given), and the backward
is one streaming pass: read ``s`` once, write ``ds`` once; extra memory is O(N P), never a feature
map. Both passes address the maps through their strides, so NCHW and channels_last inputs are read
in place (no hidden ``.contiguous()`` copies). Accumulation is fp32 (fp64 for fp64 inputs).

Kernel plan, per pair: forward = channel-energy kernel on the student (pool fused), the same kernel on
the teacher, then a per-sample finalize kernel over the O(N P) energies (norms, squared difference,
``u``); backward = one streaming kernel. The big maps are each read exactly once per pass.

Composition: the launchers are registered as dispatcher ops (``torch.ops.asmb_kd.*``, with fake
implementations) and an autograd.Function owns the gradient. That works eagerly, under
``torch.func.grad``, and inside ``torch.compile`` with ``.backward()`` or ``torch.autograd.grad``
(``torch._dynamo.config.trace_autograd_ops = True``). It does not work inside
``torch.compile(torch.func.grad(...))``: torch 2.14.1 drops custom backwards there
(pytorch/pytorch#193279), so dispatch sends ``auto`` to the reference and refuses ``triton``
(see :mod:`kernels._dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._dispatch import count_launch, resolve_backend, tl, triton
from .reference import NORMALIZE_EPS, accumulation_dtype, attention_map

__all__ = ["attention_map", "attention_transfer_loss", "attention_transfer_pair_loss"]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _channel_energy_kernel(
    feature_ptr,  # (N, C, KH*H, KW*W), any strides
    energy_ptr,  # (N, H*W) ACC, contiguous: q[n,p] = 1/C sum_c pooled^2
    channels,
    width_out,
    positions_out,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    inv_channels,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT_POSITIONS: tl.constexpr,  # KH = KW = 1 and stride_h == W * stride_w: p indexes directly
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    sample = tl.program_id(0)
    positions = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    position_mask = positions < positions_out
    if FLAT_POSITIONS:
        position_offsets = positions * stride_w
    else:
        row_out = positions // width_out
        col_out = positions % width_out
    sample_ptr = feature_ptr + sample.to(tl.int64) * stride_n
    energy = tl.zeros([BLOCK_P], dtype=ACC)
    for channel_start in range(0, channels, BLOCK_C):
        channel = channel_start + tl.arange(0, BLOCK_C)
        mask = (channel[:, None] < channels) & position_mask[None, :]
        channel_ptr = sample_ptr + channel[:, None] * stride_c
        if FLAT_POSITIONS:
            pooled = tl.load(channel_ptr + position_offsets[None, :], mask=mask, other=0.0).to(ACC)
        else:
            pooled = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
            for i in tl.static_range(KH):
                for j in tl.static_range(KW):
                    offsets = (row_out * KH + i) * stride_h + (col_out * KW + j) * stride_w
                    pooled += tl.load(channel_ptr + offsets[None, :], mask=mask, other=0.0).to(ACC)
            pooled = pooled * (1.0 / (KH * KW))
        energy += tl.sum(pooled * pooled, axis=0)
    tl.store(energy_ptr + sample * positions_out + positions, energy * inv_channels, mask=position_mask)


@triton.jit
def _attention_finalize_kernel(
    student_energy_ptr,  # (N, P) ACC
    teacher_energy_ptr,  # (N, P) ACC
    direction_ptr,  # (N, P) ACC out: u = (delta - m a_s gamma) / r_s
    sample_loss_ptr,  # (N,) ACC out: sum_p delta^2 / (N P)
    positions,
    inv_count,  # 1 / (N P)
    eps,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    sample = tl.program_id(0)
    row = sample.to(tl.int64) * positions
    offsets = tl.arange(0, BLOCK_P)
    # Pass 1: the two L2 norms.
    student_sq = tl.zeros([BLOCK_P], dtype=ACC)
    teacher_sq = tl.zeros([BLOCK_P], dtype=ACC)
    for start in range(0, positions, BLOCK_P):
        mask = start + offsets < positions
        q_s = tl.load(student_energy_ptr + row + start + offsets, mask=mask, other=0.0)
        q_t = tl.load(teacher_energy_ptr + row + start + offsets, mask=mask, other=0.0)
        student_sq += q_s * q_s
        teacher_sq += q_t * q_t
    student_norm = tl.sqrt(tl.sum(student_sq, axis=0))
    teacher_norm = tl.sqrt(tl.sum(teacher_sq, axis=0))
    inv_student_norm = 1.0 / tl.maximum(student_norm, eps)
    inv_teacher_norm = 1.0 / tl.maximum(teacher_norm, eps)
    # Pass 2: elementwise squared difference of the normalised maps, and gamma = sum a_s delta.
    squared = tl.zeros([BLOCK_P], dtype=ACC)
    projection = tl.zeros([BLOCK_P], dtype=ACC)
    for start in range(0, positions, BLOCK_P):
        mask = start + offsets < positions
        a_s = tl.load(student_energy_ptr + row + start + offsets, mask=mask, other=0.0) * inv_student_norm
        a_t = tl.load(teacher_energy_ptr + row + start + offsets, mask=mask, other=0.0) * inv_teacher_norm
        delta = a_s - a_t
        squared += delta * delta
        projection += a_s * delta
    tl.store(sample_loss_ptr + sample, tl.sum(squared, axis=0) * inv_count)
    # The normalisation's Jacobian only exists while the clamp is inactive.
    gamma = tl.where(student_norm > eps, tl.sum(projection, axis=0), 0.0)
    # Pass 3: u, the gradient direction w.r.t. the student's energy map (O(N P), stays in cache).
    for start in range(0, positions, BLOCK_P):
        mask = start + offsets < positions
        a_s = tl.load(student_energy_ptr + row + start + offsets, mask=mask, other=0.0) * inv_student_norm
        a_t = tl.load(teacher_energy_ptr + row + start + offsets, mask=mask, other=0.0) * inv_teacher_norm
        direction = (a_s - a_t - a_s * gamma) * inv_student_norm
        tl.store(direction_ptr + row + start + offsets, direction, mask=mask)


@triton.jit
def _attention_backward_kernel(
    feature_ptr,  # (N, C, KH*H, KW*W) student features, any strides
    grad_feature_ptr,  # same shape, own strides, input dtype
    direction_ptr,  # (N, P) ACC: u from the forward
    grad_loss_ptr,  # 0-d: upstream gradient of this pair's loss
    channels,
    width_out,
    positions_out,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    grad_stride_n,
    grad_stride_c,
    grad_stride_h,
    grad_stride_w,
    scale,  # 4 / (N P C kh kw)
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT_POSITIONS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    sample = tl.program_id(0)
    positions = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    position_mask = positions < positions_out
    grad_loss = tl.load(grad_loss_ptr).to(ACC)
    direction = tl.load(direction_ptr + sample.to(tl.int64) * positions_out + positions, mask=position_mask, other=0.0)
    coefficient = (direction * (grad_loss * scale))[None, :]  # (1, BLOCK_P)
    if FLAT_POSITIONS:
        position_offsets = positions * stride_w
        grad_position_offsets = positions * grad_stride_w
    else:
        row_out = positions // width_out
        col_out = positions % width_out
    sample_ptr = feature_ptr + sample.to(tl.int64) * stride_n
    grad_sample_ptr = grad_feature_ptr + sample.to(tl.int64) * grad_stride_n
    for channel_start in range(0, channels, BLOCK_C):
        channel = channel_start + tl.arange(0, BLOCK_C)
        mask = (channel[:, None] < channels) & position_mask[None, :]
        channel_ptr = sample_ptr + channel[:, None] * stride_c
        grad_channel_ptr = grad_sample_ptr + channel[:, None] * grad_stride_c
        if FLAT_POSITIONS:
            features = tl.load(channel_ptr + position_offsets[None, :], mask=mask, other=0.0).to(ACC)
            grad = features * coefficient
            tl.store(grad_channel_ptr + grad_position_offsets[None, :], grad.to(grad_feature_ptr.dtype.element_ty), mask=mask)
        else:
            window_sum = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
            for i in tl.static_range(KH):
                for j in tl.static_range(KW):
                    offsets = (row_out * KH + i) * stride_h + (col_out * KW + j) * stride_w
                    window_sum += tl.load(channel_ptr + offsets[None, :], mask=mask, other=0.0).to(ACC)
            # scale already holds the 1/(kh kw) of the spread; one more for the pooled value.
            grad = (window_sum * (1.0 / (KH * KW)) * coefficient).to(grad_feature_ptr.dtype.element_ty)
            for i in tl.static_range(KH):
                for j in tl.static_range(KW):
                    offsets = (row_out * KH + i) * grad_stride_h + (col_out * KW + j) * grad_stride_w
                    tl.store(grad_channel_ptr + offsets[None, :], grad, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _acc_dtype_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _flat_positions(features: Tensor, pool_h: int, pool_w: int) -> bool:
    """True when (h, w) collapse to one stride (NCHW-contiguous and channels_last both do)."""
    _, _, _, width = features.shape
    stride_h, stride_w = features.stride(2), features.stride(3)
    return pool_h == 1 and pool_w == 1 and (stride_h == width * stride_w or features.shape[2] == 1)


def _tile_shape(features: Tensor, positions: int, pooled: bool = False) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): the long side of the tile follows the contiguous axis of the map.

    Pooled tiles are smaller: the window loop keeps one address set per window element live. On
    sm_90 (``python -m kernels aot-check``) a 2048-element channels_last pooled backward tile spilled
    and a 1024-element one took 255 registers; 512 takes 96. NCHW pooled tiles of 1024 take 64.
    """
    channels_contiguous = features.stride(1) == 1 and features.shape[1] > 1
    elements = (512 if channels_contiguous else 1024) if pooled else 2048
    if channels_contiguous:  # channels_last: C is the fast axis
        block_p = min(triton.next_power_of_2(positions), 16)
        block_c = min(triton.next_power_of_2(features.shape[1]), elements // 16)
    else:  # NCHW: positions are the fast axis
        block_p = min(triton.next_power_of_2(positions), 128)
        block_c = min(triton.next_power_of_2(features.shape[1]), max(elements // block_p, 1), 32)
    return max(block_c, 1), max(block_p, 1)


def _launch_channel_energy(features: Tensor, out_hw: tuple[int, int], pool: tuple[int, int], acc: torch.dtype) -> Tensor:
    samples, channels = features.shape[:2]
    height_out, width_out = out_hw
    positions = height_out * width_out
    energy = torch.empty((samples, positions), device=features.device, dtype=acc)
    block_c, block_p = _tile_shape(features, positions, pooled=pool != (1, 1))
    grid = (samples, triton.cdiv(positions, block_p))
    _channel_energy_kernel[grid](
        features,
        energy,
        channels,
        width_out,
        positions,
        features.stride(0),
        features.stride(1),
        features.stride(2),
        features.stride(3),
        1.0 / channels,
        KH=pool[0],
        KW=pool[1],
        FLAT_POSITIONS=_flat_positions(features, *pool),
        ACC=_acc_dtype_tl(acc),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
    )
    return energy


def _at_pair_forward(student_map: Tensor, teacher_map: Tensor, pool_h: int, pool_w: int) -> tuple[Tensor, Tensor]:
    """Launch the forward kernels; returns (loss 0-d, u (N, P))."""
    count_launch("attention_transfer_pair_forward")
    acc = accumulation_dtype(student_map, teacher_map)
    samples = teacher_map.shape[0]
    out_hw = (teacher_map.shape[2], teacher_map.shape[3])
    positions = out_hw[0] * out_hw[1]
    student_energy = _launch_channel_energy(student_map, out_hw, (pool_h, pool_w), acc)
    teacher_energy = _launch_channel_energy(teacher_map, out_hw, (1, 1), acc)
    direction = torch.empty_like(student_energy)
    sample_loss = torch.empty((samples,), device=student_map.device, dtype=acc)
    _attention_finalize_kernel[(samples,)](
        student_energy,
        teacher_energy,
        direction,
        sample_loss,
        positions,
        1.0 / (samples * positions),
        NORMALIZE_EPS,
        ACC=_acc_dtype_tl(acc),
        BLOCK_P=min(triton.next_power_of_2(positions), 1024),
    )
    return sample_loss.sum(), direction


def _at_pair_backward(grad_loss: Tensor, student_map: Tensor, direction: Tensor, pool_h: int, pool_w: int) -> Tensor:
    count_launch("attention_transfer_pair_backward")
    samples, channels, height_in, width_in = student_map.shape
    height_out, width_out = height_in // pool_h, width_in // pool_w
    positions = height_out * width_out
    grad_student = torch.empty_like(student_map)  # keeps channels_last when the input has it
    block_c, block_p = _tile_shape(student_map, positions, pooled=(pool_h, pool_w) != (1, 1))
    grid = (samples, triton.cdiv(positions, block_p))
    flat = _flat_positions(student_map, pool_h, pool_w) and _flat_positions(grad_student, pool_h, pool_w)
    _attention_backward_kernel[grid](
        student_map,
        grad_student,
        direction,
        grad_loss,
        channels,
        width_out,
        positions,
        student_map.stride(0),
        student_map.stride(1),
        student_map.stride(2),
        student_map.stride(3),
        grad_student.stride(0),
        grad_student.stride(1),
        grad_student.stride(2),
        grad_student.stride(3),
        4.0 / (samples * positions * channels * pool_h * pool_w),
        KH=pool_h,
        KW=pool_w,
        FLAT_POSITIONS=flat,
        ACC=_acc_dtype_tl(direction.dtype),
        BLOCK_C=block_c,
        BLOCK_P=block_p,
    )
    return grad_student


# ----------------------------------------------------------------------------------------------
# Dispatcher ops around the launchers, and the autograd.Function (ctx-free forward +
# setup_context: the form torch.func and torch.compile accept)
# ----------------------------------------------------------------------------------------------
# Each launcher is a plain, non-differentiable dispatcher op (torch.library.define, not
# torch.library.custom_op, whose autograd wrapper torch.func rejects) with a fake, shape-only
# implementation. torch.compile then traces one opaque op without looking into Triton (Dynamo's
# own Triton-kernel capture has no torch.func rule), and under torch.func.grad the dispatcher
# unwraps the backward's grad-tracking tensors before a kernel receives them.
# Differentiation stays with the autograd.Function.

_LIBRARY = torch.library.Library("asmb_kd", "FRAGMENT")
_LIBRARY.define("attention_transfer_pair_forward(Tensor student_map, Tensor teacher_map, int pool_h, int pool_w) -> (Tensor, Tensor)")
_LIBRARY.define("attention_transfer_pair_backward(Tensor grad_loss, Tensor student_map, Tensor direction, int pool_h, int pool_w) -> Tensor")


def _at_pair_forward_impl(student_map, teacher_map, pool_h, pool_w):
    return _at_pair_forward(student_map, teacher_map, pool_h, pool_w)


def _at_pair_backward_impl(grad_loss, student_map, direction, pool_h, pool_w):
    return _at_pair_backward(grad_loss.contiguous(), student_map, direction, pool_h, pool_w)


_LIBRARY.impl("attention_transfer_pair_forward", _at_pair_forward_impl, "CompositeExplicitAutograd")
_LIBRARY.impl("attention_transfer_pair_backward", _at_pair_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("asmb_kd::attention_transfer_pair_forward", lib=_LIBRARY)
def _(student_map, teacher_map, pool_h, pool_w):
    acc = accumulation_dtype(student_map, teacher_map)
    samples, _, height, width = teacher_map.shape
    loss = student_map.new_empty((), dtype=acc)
    return loss, student_map.new_empty((samples, height * width), dtype=acc)


@torch.library.register_fake("asmb_kd::attention_transfer_pair_backward", lib=_LIBRARY)
def _(grad_loss, student_map, direction, pool_h, pool_w):
    return torch.empty_like(student_map)


_at_pair_forward_op = torch.ops.asmb_kd.attention_transfer_pair_forward
_at_pair_backward_op = torch.ops.asmb_kd.attention_transfer_pair_backward


class _AttentionTransferPair(torch.autograd.Function):
    """One stage pair's AT loss; returns ``(loss, u)`` where ``u`` is saved for the backward only."""

    @staticmethod
    def forward(student_map: Tensor, teacher_map: Tensor, pool_h: int, pool_w: int) -> tuple[Tensor, Tensor]:
        return _at_pair_forward_op(student_map, teacher_map, pool_h, pool_w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student_map, _teacher_map, pool_h, pool_w = inputs
        _loss, direction = output
        ctx.save_for_backward(student_map, direction)
        ctx.pool = (pool_h, pool_w)
        ctx.mark_non_differentiable(direction)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_direction: Tensor | None):
        grad_student = None
        if ctx.needs_input_grad[0]:
            student_map, direction = ctx.saved_tensors
            grad_student = _at_pair_backward_op(grad_loss, student_map, direction, *ctx.pool)
        return grad_student, None, None, None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _in_sample_extent(features: Tensor) -> int:
    """Largest element offset inside one sample; the kernels index within a sample in int32."""
    return sum((size - 1) * stride for size, stride in zip(features.shape[1:], features.stride()[1:]))


def _check_pair(student_map: Tensor, teacher_map: Tensor) -> None:
    if student_map.dim() != 4 or teacher_map.dim() != 4:
        raise ValueError(
            f"AT maps must be (N, C, H, W); got student {tuple(student_map.shape)} "
            f"and teacher {tuple(teacher_map.shape)}"
        )
    if student_map.shape[0] != teacher_map.shape[0]:
        raise ValueError(
            f"AT maps disagree on the batch size: student {student_map.shape[0]}, teacher {teacher_map.shape[0]}"
        )


def _triton_pair_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    teacher_map = teacher_map.detach()
    if max(_in_sample_extent(student_map), _in_sample_extent(teacher_map)) >= 2**31:
        raise ValueError("attention_transfer_loss (triton): one sample's map spans >= 2**31 elements; use backend='reference'")
    (height_s, width_s), (height_t, width_t) = student_map.shape[-2:], teacher_map.shape[-2:]
    integer_ratio = height_s % height_t == 0 and width_s % width_t == 0
    if integer_ratio:  # the box average is fused into the kernels
        pool_h, pool_w = height_s // height_t, width_s // width_t
    else:  # e.g. 7x7 -> 4x4: overlapping windows, torch pools first (autograd handles its grad)
        student_map = F.adaptive_avg_pool2d(student_map, (height_t, width_t))
        pool_h = pool_w = 1
    loss, _direction = _AttentionTransferPair.apply(student_map, teacher_map, pool_h, pool_w)
    return loss


def attention_transfer_pair_loss(student_map: Tensor, teacher_map: Tensor, *, backend: str | None = None) -> Tensor:
    """``mean_{n,p} (A(pool(s)) - A(t))^2`` for one stage pair (teacher detached); see the module doc."""
    _check_pair(student_map, teacher_map)
    if resolve_backend(backend, student_map, teacher_map) == "reference":
        return reference.attention_transfer_pair_loss(student_map, teacher_map)
    return _triton_pair_loss(student_map, teacher_map)


def attention_transfer_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``sum_i w_i * mean_{n,p} (A(s_i) - A(t_i))^2``, a 0-d fp32 tensor (Zagoruyko's at_loss, p = 2).

    The student map of a pair is adaptive-avg-pooled to its teacher's H, W first when they differ
    (fused for integer ratios). Teacher maps get no gradient. Channel counts may differ freely.
    ``backend``: None (``$KD_KERNELS``, default auto), ``"auto"``, ``"triton"`` or ``"reference"``.
    """
    if len(student_maps) != len(teacher_maps):
        raise ValueError(
            f"attention_transfer_loss: {len(student_maps)} student maps but "
            f"{len(teacher_maps)} teacher maps; pass one teacher map per student map"
        )
    if len(student_maps) == 0:
        raise ValueError("attention_transfer_loss: no stage pairs given")
    if weights is not None and len(weights) != len(student_maps):
        raise ValueError(f"attention_transfer_loss: {len(weights)} weights for {len(student_maps)} stage pairs")
    for student_map, teacher_map in zip(student_maps, teacher_maps):
        _check_pair(student_map, teacher_map)
    if resolve_backend(backend, *student_maps, *teacher_maps) == "reference":
        return reference.attention_transfer_loss(student_maps, teacher_maps, weights)
    if weights is None:
        weights = [1.0] * len(student_maps)
    total = None
    for student_map, teacher_map, weight in zip(student_maps, teacher_maps, weights):
        term = weight * _triton_pair_loss(student_map, teacher_map)
        total = term if total is None else total + term
    return total
