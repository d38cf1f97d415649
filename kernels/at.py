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

So the forward saves only the per-position coefficient ``coeff[n,p] = w * 4/(N P Cs kh kw) * u[n,p]``
(fp32, O(N P) per pair; ``w`` the pair's loss weight) plus the student map it was given, and the
backward is one streaming pass, ``ds = g * coeff[n,p(i,j)] * x[n,c,p(i,j)]``: read ``s`` once, write
``ds`` once; extra memory is O(N P), never a feature map.
Both passes address the maps through their strides, so NCHW and channels_last inputs are read in
place (no hidden ``.contiguous()`` copies). Accumulation is fp32 (fp64 for fp64 inputs).

Kernel plan, all stage pairs of one loss together (pairs may differ in every shape and dtype):

* forward launch 1, ``_at_energy_kernel``: one program per (map, sample, channel split, position
  block), for the student and the teacher map of every pair: ``q`` partial sums over a slice of the
  channels, accumulated in a 2-D ``(BLOCK_C, BLOCK_P)`` register tile and reduced once after the
  channel loop (pool fused). Splitting the channels fills the GPU when ``N x position blocks`` alone
  is small (8x8 maps, 2048 channels); the splits are summed in a fixed order by launch 2, so the
  result is deterministic (no atomics on data).
* forward launch 2, ``_at_finalize_kernel``: one program per (pair, sample): norms, the squared
  difference, ``u`` and ``coeff``; each writes its weighted loss partial, takes a ticket from an
  atomic counter, and the program that draws the last ticket sums every partial in a fixed order into
  the 0-d loss (a deterministic last-program reduction; launch 1 zeroes the counter, so nothing else
  is launched).
* backward, one launch, ``_at_backward_kernel``: one program per (pair, sample, channel chunk,
  position block), elementwise: ``ds = g * coeff * x``, the pooled value spread over its window.

Per-map shapes, strides, offsets and program ranges are kernel arguments (tuples: one element per map
or pair), so the launches need no metadata tensor, no host-to-device copy, and replay in a CUDA graph.
A program finds its map by comparing its id with the pairs' program ranges (a static loop: the kernel
holds one specialised body per map). Tile shapes, ``num_warps`` and the loop's ``num_stages`` come
from a small table (:func:`_tile_config`) keyed on C, P, the element size and the layout; whole
launch plans are cached per (shapes, strides, dtypes, pools, weights). The table's values are
modelled, not tuned: no GPU timing of these kernels exists yet (see ``kernels/BENCHMARKS.md``).

Composition: one dispatcher op per direction (``torch.ops.asmb_kd.attention_transfer_forward`` /
``attention_transfer_backward``, each with a fake implementation) and an autograd.Function that owns
the gradient. That works eagerly, under ``torch.func.grad``, and inside ``torch.compile`` with
``.backward()`` or ``torch.autograd.grad`` (``torch._dynamo.config.trace_autograd_ops = True``). It
does not work inside ``torch.compile(torch.func.grad(...))``: torch 2.14.1 drops custom backwards there
(pytorch/pytorch#193279), so dispatch sends ``auto`` to the reference and refuses ``triton``
(see :mod:`kernels._dispatch`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from ._dispatch import count_launch, launch, resolve_backend, tl, triton
from .reference import NORMALIZE_EPS, accumulation_dtype, attention_map

__all__ = ["attention_map", "attention_transfer_loss", "attention_transfer_pair_loss"]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _map_tile(
    sample_ptr,  # the map's sample n
    channel,  # (BLOCK_C,) channel indices
    positions,  # (BLOCK_P,) output (pooled) position indices
    mask,  # (BLOCK_C, BLOCK_P)
    width_out,
    stride_c,
    stride_h,
    stride_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT: tl.constexpr,  # KH = KW = 1 and (h, w) collapse to one stride: p indexes directly
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """x[c, p]: the map at output positions p, box-averaged over its KH x KW window, in ACC."""
    channel_ptr = sample_ptr + channel[:, None] * stride_c
    if FLAT:
        pooled = tl.load(channel_ptr + (positions * stride_w)[None, :], mask=mask, other=0.0).to(ACC)
    else:
        row_out = positions // width_out
        col_out = positions % width_out
        pooled = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
        for i in tl.static_range(KH):
            for j in tl.static_range(KW):
                offsets = (row_out * KH + i) * stride_h + (col_out * KW + j) * stride_w
                pooled += tl.load(channel_ptr + offsets[None, :], mask=mask, other=0.0).to(ACC)
        pooled = pooled * (1.0 / (KH * KW))
    return pooled


@triton.jit
def _at_energy_kernel(
    maps,  # tuple of 2K maps (student_0, teacher_0, student_1, ...), (N, C, KH*H, KW*W), any strides
    energy_ptr,  # flat ACC out: map m's (splits, N, P) block at energy_offset[m]
    counter_ptr,  # int32: zeroed here for the finalize kernel's ticket
    channels,  # the tuples below: one element per map
    samples,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    width_out,
    positions,
    position_blocks,
    splits,
    split_channels,  # channels per split, a multiple of BLOCK_C
    program_start,  # 2K + 1 elements: map m owns programs [program_start[m], program_start[m + 1])
    energy_offset,
    inv_channels,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(counter_ptr, 0)
    for m in tl.static_range(len(maps)):
        if (pid >= program_start[m]) & (pid < program_start[m + 1]):
            local = pid - program_start[m]
            block = local % position_blocks[m]
            rest = local // position_blocks[m]
            split = rest % splits[m]
            sample = rest // splits[m]
            position = block * BLOCK_P[m] + tl.arange(0, BLOCK_P[m])
            position_mask = position < positions[m]
            sample_ptr = maps[m] + sample.to(tl.int64) * stride_n[m]
            channel_begin = split * split_channels[m]
            channel_end = tl.minimum(channel_begin + split_channels[m], channels[m])
            # 2-D accumulator: the reduction over channels happens once, after the loop.
            acc = tl.zeros([BLOCK_C[m], BLOCK_P[m]], dtype=ACC)
            for channel_start in tl.range(channel_begin, channel_end, BLOCK_C[m], num_stages=NUM_STAGES[m]):
                channel = channel_start + tl.arange(0, BLOCK_C[m])
                mask = (channel[:, None] < channel_end) & position_mask[None, :]
                pooled = _map_tile(
                    sample_ptr, channel, position, mask, width_out[m], stride_c[m], stride_h[m], stride_w[m],
                    KH[m], KW[m], FLAT[m], ACC, BLOCK_C[m], BLOCK_P[m],
                )  # fmt: skip
                acc += pooled * pooled
            energy = tl.sum(acc, axis=0) * inv_channels[m]
            row = energy_offset[m] + (split * samples[m] + sample) * positions[m]
            tl.store(energy_ptr + row + position, energy, mask=position_mask)


@triton.jit
def _energy_row(ptr, splits, samples, sample, positions, index, mask, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """sum over the channel splits of one sample's energies at ``index`` (fixed order)."""
    total = tl.zeros([BLOCK], dtype=ACC)
    for split in range(0, splits):
        total += tl.load(ptr + (split * samples + sample) * positions + index, mask=mask, other=0.0)
    return total


@triton.jit
def _at_finalize_kernel(
    energy_ptr,  # from _at_energy_kernel
    coeff_ptr,  # flat ACC out: pair k's (N, P) block at coeff_offset[k]
    partial_ptr,  # (total_programs,) ACC scratch: each program's weighted loss partial
    loss_ptr,  # 0-d ACC out
    counter_ptr,  # int32, zeroed by _at_energy_kernel
    samples,  # the tuples below: one element per pair
    positions,
    student_offset,
    student_splits,
    teacher_offset,
    teacher_splits,
    coeff_offset,
    program_start,  # K + 1 elements; program = program_start[k] + sample
    loss_scale,  # w / (N P)
    coeff_scale,  # w * 4 / (N P Cs kh kw)
    total_programs,
    eps,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    for k in tl.static_range(len(samples)):
        if (pid >= program_start[k]) & (pid < program_start[k + 1]):
            sample = pid - program_start[k]
            offsets = tl.arange(0, BLOCK_P[k])
            student_ptr = energy_ptr + student_offset[k]
            teacher_ptr = energy_ptr + teacher_offset[k]
            # Pass 1: the two L2 norms.
            student_sq = tl.zeros([BLOCK_P[k]], dtype=ACC)
            teacher_sq = tl.zeros([BLOCK_P[k]], dtype=ACC)
            for start in range(0, positions[k], BLOCK_P[k]):
                index = start + offsets
                mask = index < positions[k]
                q_s = _energy_row(student_ptr, student_splits[k], samples[k], sample, positions[k], index, mask, BLOCK_P[k], ACC)
                q_t = _energy_row(teacher_ptr, teacher_splits[k], samples[k], sample, positions[k], index, mask, BLOCK_P[k], ACC)
                student_sq += q_s * q_s
                teacher_sq += q_t * q_t
            student_norm = tl.sqrt(tl.sum(student_sq, axis=0))
            teacher_norm = tl.sqrt(tl.sum(teacher_sq, axis=0))
            inv_student_norm = 1.0 / tl.maximum(student_norm, eps)
            inv_teacher_norm = 1.0 / tl.maximum(teacher_norm, eps)
            # Pass 2: elementwise squared difference of the normalised maps, and gamma = sum a_s delta.
            squared = tl.zeros([BLOCK_P[k]], dtype=ACC)
            projection = tl.zeros([BLOCK_P[k]], dtype=ACC)
            for start in range(0, positions[k], BLOCK_P[k]):
                index = start + offsets
                mask = index < positions[k]
                a_s = _energy_row(student_ptr, student_splits[k], samples[k], sample, positions[k], index, mask, BLOCK_P[k], ACC) * inv_student_norm
                a_t = _energy_row(teacher_ptr, teacher_splits[k], samples[k], sample, positions[k], index, mask, BLOCK_P[k], ACC) * inv_teacher_norm
                delta = a_s - a_t
                squared += delta * delta
                projection += a_s * delta
            tl.store(partial_ptr + pid, tl.sum(squared, axis=0) * loss_scale[k])
            # The normalisation's Jacobian only exists while the clamp is inactive.
            gamma = tl.where(student_norm > eps, tl.sum(projection, axis=0), 0.0)
            # Pass 3: coeff = scale * u, u the gradient direction w.r.t. the student's energy map.
            for start in range(0, positions[k], BLOCK_P[k]):
                index = start + offsets
                mask = index < positions[k]
                a_s = _energy_row(student_ptr, student_splits[k], samples[k], sample, positions[k], index, mask, BLOCK_P[k], ACC) * inv_student_norm
                a_t = _energy_row(teacher_ptr, teacher_splits[k], samples[k], sample, positions[k], index, mask, BLOCK_P[k], ACC) * inv_teacher_norm
                direction = (a_s - a_t - a_s * gamma) * inv_student_norm
                tl.store(coeff_ptr + coeff_offset[k] + sample * positions[k] + index, direction * coeff_scale[k], mask=mask)
    # Deterministic last-program reduction: every program has stored its partial; the barrier orders
    # the CTA's stores before the (acq_rel, GPU-scope) ticket; whoever draws the last ticket sums all
    # partials in index order, so the result does not depend on which program finishes last.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == total_programs - 1:
        lanes = tl.arange(0, BLOCK_R)
        total = tl.zeros([BLOCK_R], dtype=ACC)
        for start in range(0, total_programs, BLOCK_R):
            index = start + lanes
            total += tl.load(partial_ptr + index, mask=index < total_programs, other=0.0, volatile=True)
        tl.store(loss_ptr, tl.sum(total, axis=0))


@triton.jit
def _at_backward_kernel(
    students,  # tuple of K student maps, any strides
    grads,  # tuple of K gradients (out), the students' shapes, any strides
    coeff_ptr,  # from the forward
    grad_loss_ptr,  # 0-d upstream gradient
    channels,  # the tuples below: one element per pair
    width_out,
    positions,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    grad_stride_n,
    grad_stride_c,
    grad_stride_h,
    grad_stride_w,
    position_blocks,
    channel_chunks,
    chunk_channels,  # channels per program, a multiple of BLOCK_C
    program_start,  # K + 1 elements
    coeff_offset,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    for k in tl.static_range(len(students)):
        if (pid >= program_start[k]) & (pid < program_start[k + 1]):
            local = pid - program_start[k]
            block = local % position_blocks[k]
            rest = local // position_blocks[k]
            chunk = rest % channel_chunks[k]
            sample = rest // channel_chunks[k]
            position = block * BLOCK_P[k] + tl.arange(0, BLOCK_P[k])
            position_mask = position < positions[k]
            grad_loss = tl.load(grad_loss_ptr).to(ACC)
            coefficient = tl.load(coeff_ptr + coeff_offset[k] + sample * positions[k] + position, mask=position_mask, other=0.0)
            coefficient = (coefficient * grad_loss)[None, :]
            sample_ptr = students[k] + sample.to(tl.int64) * stride_n[k]
            grad_sample_ptr = grads[k] + sample.to(tl.int64) * grad_stride_n[k]
            channel_begin = chunk * chunk_channels[k]
            channel_end = tl.minimum(channel_begin + chunk_channels[k], channels[k])
            if not FLAT[k]:
                row_out = position // width_out[k]
                col_out = position % width_out[k]
            for channel_start in tl.range(channel_begin, channel_end, BLOCK_C[k], num_stages=NUM_STAGES[k]):
                channel = channel_start + tl.arange(0, BLOCK_C[k])
                mask = (channel[:, None] < channel_end) & position_mask[None, :]
                pooled = _map_tile(
                    sample_ptr, channel, position, mask, width_out[k], stride_c[k], stride_h[k], stride_w[k],
                    KH[k], KW[k], FLAT[k], ACC, BLOCK_C[k], BLOCK_P[k],
                )  # fmt: skip
                # coeff holds the 1/(kh kw) of the spread; every element of a window gets the same.
                grad = (pooled * coefficient).to(grads[k].dtype.element_ty)
                grad_channel_ptr = grad_sample_ptr + channel[:, None] * grad_stride_c[k]
                if FLAT[k]:
                    tl.store(grad_channel_ptr + (position * grad_stride_w[k])[None, :], grad, mask=mask)
                else:
                    for i in tl.static_range(KH[k]):
                        for j in tl.static_range(KW[k]):
                            offsets = (row_out * KH[k] + i) * grad_stride_h[k] + (col_out * KW[k] + j) * grad_stride_w[k]
                            tl.store(grad_channel_ptr + offsets[None, :], grad, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch plans: tile table, channel splits, program ranges (cached per shapes/strides/dtypes)
# ----------------------------------------------------------------------------------------------

# (layout, pooled) -> (elements per tile, num_stages of the channel loop when it has > 1 iteration).
# Element budgets: on sm_90 (``python -m kernels aot-check``) a 2048-element channels_last pooled tile
# spilled with the old 1-D accumulator; pooled tiles stay at 512 (NHWC) / 1024 (NCHW). Stages: 3 for
# the plain streaming loops, 2 where the window loop keeps more addresses live. Modelled, not tuned.
_TILE_TABLE = {
    ("nchw", False): (2048, 3),
    ("nchw", True): (1024, 2),
    ("nhwc", False): (2048, 3),
    ("nhwc", True): (512, 2),
}
_FINALIZE_BLOCK = 1024
_REDUCE_BLOCK = 1024
_MAX_SPLITS = 16  # channel splits per map in the forward (the finalize reads each split once)
_PROGRAMS_PER_SM = 4  # target programs per SM when choosing channel splits / chunks
_CPU_PLAN_SMS = 132  # off-GPU (interpreter, meta tensors) plans are made for an H100/H200-sized GPU


class _TileConfig(NamedTuple):
    block_c: int
    block_p: int
    num_warps: int
    num_stages: int


def _tile_config(channels: int, positions: int, element_size: int, channels_contiguous: bool, pooled: bool) -> _TileConfig:
    """(BLOCK_C, BLOCK_P, num_warps, num_stages) for one map, from :data:`_TILE_TABLE`.

    The long side of the tile follows the contiguous axis of the map (positions for NCHW, channels for
    channels_last). Half-precision maps get the same element budget: the accumulator is fp32 either way.
    """
    del element_size  # the table does not distinguish element sizes yet (nothing measured to say how)
    layout = "nhwc" if channels_contiguous else "nchw"
    elements, stages = _TILE_TABLE[(layout, pooled)]
    if channels_contiguous:  # channels_last: C is the fast axis
        block_p = min(triton.next_power_of_2(positions), 16)
        block_c = min(triton.next_power_of_2(channels), elements // 16)
    else:  # NCHW: positions are the fast axis
        block_p = min(triton.next_power_of_2(positions), 128)
        block_c = min(triton.next_power_of_2(channels), max(elements // block_p, 1), 32)
    block_c, block_p = max(block_c, 1), max(block_p, 1)
    tile = block_c * block_p
    num_warps = 8 if tile >= 2048 else 4 if tile >= 512 else 2 if tile >= 128 else 1
    num_stages = stages if channels > block_c else 1
    return _TileConfig(block_c, block_p, num_warps, num_stages)


def _flat_positions(shape: Sequence[int], stride: Sequence[int], pool_h: int, pool_w: int) -> bool:
    """True when (h, w) collapse to one stride (NCHW-contiguous and channels_last both do)."""
    return pool_h == 1 and pool_w == 1 and (stride[2] == shape[3] * stride[3] or shape[2] == 1)


def _channels_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    return stride[1] == 1 and shape[1] > 1


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _PROGRAMS_PER_SM * _sm_count(index)
    return _PROGRAMS_PER_SM * _CPU_PLAN_SMS


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(channel_blocks: int, block_c: int, base_programs: int, target: int, cap: int) -> tuple[int, int]:
    """(number of channel slices, channels per slice): enough programs to reach ``target``."""
    wanted = max(1, min(cap, channel_blocks, triton.cdiv(target, max(base_programs, 1))))
    per_slice = triton.cdiv(channel_blocks, wanted) * block_c
    return triton.cdiv(channel_blocks * block_c, per_slice), per_slice


_MapSpec = tuple  # (shape, stride, element_size, pool_h, pool_w)


class _ForwardPlan(NamedTuple):
    energy_args: tuple  # after (maps, energy, counter)
    energy_meta: dict
    energy_grid: int
    energy_size: int
    finalize_args: tuple  # after (energy, coeff, partials, loss, counter)
    finalize_meta: dict
    finalize_grid: int
    coeff_size: int


@functools.lru_cache(maxsize=512)
def _forward_plan(pairs: tuple, weights: tuple, target: int, acc_is_fp64: bool) -> _ForwardPlan:
    """``pairs``: per pair ((student spec), (teacher spec)), each spec (shape, stride, element size, kh, kw)."""
    acc = tl.float64 if acc_is_fp64 else tl.float32
    fields = {name: [] for name in (
        "channels", "samples", "stride_n", "stride_c", "stride_h", "stride_w", "width_out", "positions",
        "position_blocks", "splits", "split_channels", "program_start", "energy_offset", "inv_channels",
        "KH", "KW", "FLAT", "BLOCK_C", "BLOCK_P", "NUM_STAGES")}  # fmt: skip
    programs = energy_size = 0
    warps = 1
    map_layout = []  # per map: (energy offset, splits)
    for spec in (spec for pair in pairs for spec in pair):
        shape, stride, element_size, pool_h, pool_w = spec
        samples, channels, height, width = shape
        height_out, width_out = height // pool_h, width // pool_w
        positions = height_out * width_out
        pooled = (pool_h, pool_w) != (1, 1)
        config = _tile_config(channels, positions, element_size, _channels_contiguous(shape, stride), pooled)
        position_blocks = triton.cdiv(positions, config.block_p)
        channel_blocks = triton.cdiv(channels, config.block_c)
        splits, split_channels = _split(channel_blocks, config.block_c, samples * position_blocks, target, _MAX_SPLITS)
        values = dict(
            channels=channels, samples=samples, stride_n=stride[0], stride_c=stride[1], stride_h=stride[2],
            stride_w=stride[3], width_out=width_out, positions=positions, position_blocks=position_blocks,
            splits=splits, split_channels=split_channels, program_start=programs, energy_offset=energy_size,
            inv_channels=1.0 / channels, KH=pool_h, KW=pool_w, FLAT=_flat_positions(shape, stride, pool_h, pool_w),
            BLOCK_C=config.block_c, BLOCK_P=config.block_p, NUM_STAGES=config.num_stages,
        )  # fmt: skip
        for name, value in values.items():
            fields[name].append(value)
        map_layout.append((energy_size, splits))
        programs += samples * splits * position_blocks
        energy_size += splits * samples * positions
        warps = max(warps, config.num_warps)
    fields["program_start"].append(programs)
    constexpr_names = ("KH", "KW", "FLAT", "BLOCK_C", "BLOCK_P", "NUM_STAGES")
    energy_args = tuple(tuple(fields[name]) for name in fields if name not in constexpr_names)
    energy_meta = {name: tuple(fields[name]) for name in constexpr_names}
    energy_meta.update(ACC=acc, num_warps=warps)

    final = {name: [] for name in (
        "samples", "positions", "student_offset", "student_splits", "teacher_offset", "teacher_splits",
        "coeff_offset", "program_start", "loss_scale", "coeff_scale")}  # fmt: skip
    final_programs = coeff_size = 0
    blocks = []
    for index, ((student, teacher), weight) in enumerate(zip(pairs, weights)):
        (samples, channels, _, _), pool_h, pool_w = student[0], student[3], student[4]
        positions = teacher[0][2] * teacher[0][3]
        count = samples * positions
        values = dict(
            samples=samples, positions=positions,
            student_offset=map_layout[2 * index][0], student_splits=map_layout[2 * index][1],
            teacher_offset=map_layout[2 * index + 1][0], teacher_splits=map_layout[2 * index + 1][1],
            coeff_offset=coeff_size, program_start=final_programs, loss_scale=weight / count,
            coeff_scale=weight * 4.0 / (count * channels * pool_h * pool_w),
        )  # fmt: skip
        for name, value in values.items():
            final[name].append(value)
        blocks.append(min(triton.next_power_of_2(positions), _FINALIZE_BLOCK))
        final_programs += samples
        coeff_size += count
    final["program_start"].append(final_programs)
    if max(energy_size, coeff_size) >= 2**31:  # the kernels index the energy rows and coeff in int32
        raise ValueError("attention_transfer_loss (triton): N x H x W too large for the int32 energy index; use backend='reference'")
    finalize_args = tuple(tuple(values) for values in final.values()) + (final_programs, NORMALIZE_EPS)
    finalize_meta = dict(
        BLOCK_P=tuple(blocks), BLOCK_R=min(triton.next_power_of_2(final_programs), _REDUCE_BLOCK), ACC=acc,
        # sm_90 (aot-check): 1024-position blocks spilled 16 bytes with 4 warps; 8 warps do not.
        num_warps=8 if max(blocks) >= 1024 else 4 if max(blocks) >= 512 else 2 if max(blocks) >= 128 else 1,
    )  # fmt: skip
    return _ForwardPlan(energy_args, energy_meta, programs, energy_size, finalize_args, finalize_meta, final_programs, coeff_size)


class _BackwardPlan(NamedTuple):
    args: tuple  # after (students, grads, coeff, grad_loss)
    meta: dict
    grid: int


@functools.lru_cache(maxsize=512)
def _backward_plan(students: tuple, target: int, acc_is_fp64: bool) -> _BackwardPlan:
    """``students``: per pair (shape, stride, grad stride, element size, kh, kw)."""
    fields = {name: [] for name in (
        "channels", "width_out", "positions", "stride_n", "stride_c", "stride_h", "stride_w", "grad_stride_n",
        "grad_stride_c", "grad_stride_h", "grad_stride_w", "position_blocks", "channel_chunks", "chunk_channels",
        "program_start", "coeff_offset", "KH", "KW", "FLAT", "BLOCK_C", "BLOCK_P", "NUM_STAGES")}  # fmt: skip
    programs = coeff_size = 0
    warps = 1
    for shape, stride, grad_stride, element_size, pool_h, pool_w in students:
        samples, channels, height, width = shape
        height_out, width_out = height // pool_h, width // pool_w
        positions = height_out * width_out
        pooled = (pool_h, pool_w) != (1, 1)
        config = _tile_config(channels, positions, element_size, _channels_contiguous(shape, stride), pooled)
        position_blocks = triton.cdiv(positions, config.block_p)
        channel_blocks = triton.cdiv(channels, config.block_c)
        # Elementwise: any chunking is exact; chunks of >= 2 blocks keep a loop to pipeline.
        chunks, chunk_channels = _split(channel_blocks, config.block_c, samples * position_blocks, target, channel_blocks)
        flat = _flat_positions(shape, stride, pool_h, pool_w) and _flat_positions(shape, grad_stride, pool_h, pool_w)
        values = dict(
            channels=channels, width_out=width_out, positions=positions, stride_n=stride[0], stride_c=stride[1],
            stride_h=stride[2], stride_w=stride[3], grad_stride_n=grad_stride[0], grad_stride_c=grad_stride[1],
            grad_stride_h=grad_stride[2], grad_stride_w=grad_stride[3], position_blocks=position_blocks,
            channel_chunks=chunks, chunk_channels=chunk_channels, program_start=programs, coeff_offset=coeff_size,
            KH=pool_h, KW=pool_w, FLAT=flat, BLOCK_C=config.block_c, BLOCK_P=config.block_p,
            NUM_STAGES=config.num_stages if chunk_channels > config.block_c else 1,
        )  # fmt: skip
        for name, value in values.items():
            fields[name].append(value)
        programs += samples * chunks * position_blocks
        coeff_size += samples * positions
        warps = max(warps, config.num_warps)
    fields["program_start"].append(programs)
    constexpr_names = ("KH", "KW", "FLAT", "BLOCK_C", "BLOCK_P", "NUM_STAGES")
    args = tuple(tuple(fields[name]) for name in fields if name not in constexpr_names)
    meta = {name: tuple(fields[name]) for name in constexpr_names}
    meta.update(ACC=tl.float64 if acc_is_fp64 else tl.float32, num_warps=warps)
    return _BackwardPlan(args, meta, programs)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _spec(features: Tensor, pool_h: int, pool_w: int) -> _MapSpec:
    return (tuple(features.shape), tuple(features.stride()), features.element_size(), pool_h, pool_w)


def _at_forward(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], pools: Sequence[int], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Two launches for every pair together; returns (weighted loss 0-d, coeff (sum_k N_k P_k,))."""
    count_launch("attention_transfer_pair_forward", len(student_maps))
    acc = accumulation_dtype(*student_maps, *teacher_maps)
    device = student_maps[0].device
    pairs = tuple(
        (_spec(s, pools[2 * i], pools[2 * i + 1]), _spec(t, 1, 1)) for i, (s, t) in enumerate(zip(student_maps, teacher_maps))
    )
    plan = _forward_plan(pairs, tuple(float(w) for w in weights), _target_programs(device), acc == torch.float64)
    workspace = torch.empty((plan.energy_size + plan.finalize_grid,), device=device, dtype=acc)
    energy, partials = workspace[: plan.energy_size], workspace[plan.energy_size :]
    coeff = torch.empty((plan.coeff_size,), device=device, dtype=acc)
    loss = torch.empty((), device=device, dtype=acc)
    counter = torch.empty((1,), device=device, dtype=torch.int32)
    maps = tuple(m for pair in zip(student_maps, teacher_maps) for m in pair)
    launch(_at_energy_kernel, (plan.energy_grid,), maps, energy, counter, *plan.energy_args, **plan.energy_meta)
    launch(_at_finalize_kernel, (plan.finalize_grid,), energy, coeff, partials, loss, counter, *plan.finalize_args, **plan.finalize_meta)
    return loss, coeff


def _grad_like(student: Tensor) -> Tensor:
    return torch.empty_like(student)  # keeps channels_last (any dense layout) when the input has it


def _at_backward(grad_loss: Tensor, student_maps: Sequence[Tensor], coeff: Tensor, pools: Sequence[int]) -> list[Tensor]:
    """One elementwise launch for every pair: ``ds = g * coeff * x``."""
    count_launch("attention_transfer_pair_backward", len(student_maps))
    grads = [_grad_like(s) for s in student_maps]
    specs = tuple(
        (tuple(s.shape), tuple(s.stride()), tuple(g.stride()), s.element_size(), pools[2 * i], pools[2 * i + 1])
        for i, (s, g) in enumerate(zip(student_maps, grads))
    )
    plan = _backward_plan(specs, _target_programs(coeff.device), coeff.dtype == torch.float64)
    launch(_at_backward_kernel, (plan.grid,), tuple(student_maps), tuple(grads), coeff, grad_loss, *plan.args, **plan.meta)
    return grads


# ----------------------------------------------------------------------------------------------
# Dispatcher ops around the launchers, and the autograd.Function (ctx-free forward +
# setup_context: the form torch.func and torch.compile accept)
# ----------------------------------------------------------------------------------------------
# Each launcher is a plain, non-differentiable dispatcher op (torch.library.define, not
# torch.library.custom_op, whose autograd wrapper torch.func rejects) with a fake, shape-only
# implementation. torch.compile then traces one opaque op without looking into Triton (Dynamo's
# own Triton-kernel capture has no torch.func rule), and under torch.func.grad the dispatcher
# unwraps the backward's grad-tracking tensors before a kernel receives them.
# Differentiation stays with the autograd.Function. ``pools`` is flat: (kh_0, kw_0, kh_1, kw_1, ...).

_LIBRARY = torch.library.Library("asmb_kd", "FRAGMENT")
_LIBRARY.define(
    "attention_transfer_forward(Tensor[] student_maps, Tensor[] teacher_maps, int[] pools, float[] weights) -> (Tensor, Tensor)"
)
_LIBRARY.define("attention_transfer_backward(Tensor grad_loss, Tensor[] student_maps, Tensor coeff, int[] pools) -> Tensor[]")


def _at_forward_impl(student_maps, teacher_maps, pools, weights):
    return _at_forward(student_maps, teacher_maps, pools, weights)


def _at_backward_impl(grad_loss, student_maps, coeff, pools):
    return _at_backward(grad_loss.contiguous(), student_maps, coeff, pools)


_LIBRARY.impl("attention_transfer_forward", _at_forward_impl, "CompositeExplicitAutograd")
_LIBRARY.impl("attention_transfer_backward", _at_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("asmb_kd::attention_transfer_forward", lib=_LIBRARY)
def _(student_maps, teacher_maps, pools, weights):
    acc = accumulation_dtype(*student_maps, *teacher_maps)
    size = sum(t.shape[0] * t.shape[2] * t.shape[3] for t in teacher_maps)
    first = student_maps[0]
    return first.new_empty((), dtype=acc), first.new_empty((size,), dtype=acc)


@torch.library.register_fake("asmb_kd::attention_transfer_backward", lib=_LIBRARY)
def _(grad_loss, student_maps, coeff, pools):
    return [_grad_like(s) for s in student_maps]


_at_forward_op = torch.ops.asmb_kd.attention_transfer_forward
_at_backward_op = torch.ops.asmb_kd.attention_transfer_backward


class _AttentionTransfer(torch.autograd.Function):
    """Every stage pair's weighted AT loss at once: ``apply(pools, weights, *students, *teachers)``.

    Returns ``(loss, coeff)``; ``coeff`` is saved for the backward only.
    """

    @staticmethod
    def forward(pools: tuple[int, ...], weights: tuple[float, ...], *maps: Tensor) -> tuple[Tensor, Tensor]:
        pairs = len(maps) // 2
        return _at_forward_op(list(maps[:pairs]), list(maps[pairs:]), list(pools), list(weights))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pools, _weights, *maps = inputs
        _loss, coeff = output
        ctx.save_for_backward(coeff, *maps[: len(maps) // 2])
        ctx.pools = pools
        ctx.mark_non_differentiable(coeff)
        # No zero-filled gradient for coeff (a fill kernel per backward on a GPU): it arrives as None.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, _grad_coeff: Tensor | None):
        coeff, *students = ctx.saved_tensors
        pairs = len(students)
        needs = ctx.needs_input_grad[2 : 2 + pairs]
        grads = [None] * pairs
        if grad_loss is not None and any(needs):
            grads = _at_backward_op(grad_loss, students, coeff, list(ctx.pools))
            grads = [grad if need else None for grad, need in zip(grads, needs)]
        return (None, None, *grads, *([None] * pairs))


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


def _prepare_pair(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """(student map as the kernels read it, detached teacher, kh, kw)."""
    teacher_map = teacher_map.detach()
    if max(_in_sample_extent(student_map), _in_sample_extent(teacher_map)) >= 2**31:
        raise ValueError("attention_transfer_loss (triton): one sample's map spans >= 2**31 elements; use backend='reference'")
    (height_s, width_s), (height_t, width_t) = student_map.shape[-2:], teacher_map.shape[-2:]
    if height_s % height_t == 0 and width_s % width_t == 0:  # the box average is fused into the kernels
        return student_map, teacher_map, height_s // height_t, width_s // width_t
    # e.g. 7x7 -> 4x4: overlapping windows, torch pools first (autograd handles its grad)
    return F.adaptive_avg_pool2d(student_map, (height_t, width_t)), teacher_map, 1, 1


def _triton_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    prepared = [_prepare_pair(s, t) for s, t in zip(student_maps, teacher_maps)]
    students = [p[0] for p in prepared]
    teachers = [p[1] for p in prepared]
    pools = tuple(size for p in prepared for size in p[2:])
    loss, _coeff = _AttentionTransfer.apply(pools, tuple(float(w) for w in weights), *students, *teachers)
    return loss


def attention_transfer_pair_loss(student_map: Tensor, teacher_map: Tensor, *, backend: str | None = None) -> Tensor:
    """``mean_{n,p} (A(pool(s)) - A(t))^2`` for one stage pair (teacher detached); see the module doc."""
    _check_pair(student_map, teacher_map)
    if resolve_backend(backend, student_map, teacher_map) == "reference":
        return reference.attention_transfer_pair_loss(student_map, teacher_map)
    return _triton_loss([student_map], [teacher_map], [1.0])


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
    With Triton, every pair is computed by the same two forward launches and one backward launch; the
    weights are folded into the kernels when they are Python numbers (tensor weights multiply
    per-pair losses outside, one op call per pair).
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
    if all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        return _triton_loss(student_maps, teacher_maps, weights)
    total = None
    for student_map, teacher_map, weight in zip(student_maps, teacher_maps, weights):
        term = weight * _triton_loss([student_map], [teacher_map], [1.0])
        total = term if total is None else total + term
    return total
