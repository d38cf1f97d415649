"""Fused AT kernel vs its pure-torch reference (CPU: Triton interpreter; GPU: compiled kernels).

The reference itself is pinned by a hand-written formula on a tiny case, so a wrong reference cannot
make the kernel comparisons pass vacuously.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton chooses interpret-or-compile when it is imported, so this must precede any import of it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

import kernels
from kernels import at, reference
from kernels._dispatch import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _triton_runnable():
    if DEVICE == "cpu" and not interpreting():
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
            "CPU; export TRITON_INTERPRET=1 (or set it in tests/conftest.py) for this test run"
        )


def _maps(student_shape, teacher_shape, dtype=torch.float32, channels_last=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(student_shape, generator=generator, dtype=torch.float64)
    teacher = torch.randn(teacher_shape, generator=generator, dtype=torch.float64)
    student, teacher = student.to(DEVICE, dtype), teacher.to(DEVICE, dtype)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    return student, teacher


def _loss_and_grads(loss_fn, student_maps, teacher_maps, weights=None, grad_output=1.0):
    """Loss value and student gradients of ``loss_fn`` for fresh leaf copies of the inputs."""
    students = [s.detach().clone().requires_grad_(True) for s in student_maps]
    teachers = [t.detach().clone().requires_grad_(True) for t in teacher_maps]  # must get no grad
    loss = loss_fn(students, teachers, weights)
    loss.backward(torch.full_like(loss, grad_output))
    return loss.detach(), [s.grad for s in students], [t.grad for t in teachers], students


def _triton(students, teachers, weights):
    return at.attention_transfer_loss(students, teachers, weights, backend="triton")


def _reference(students, teachers, weights):
    return reference.attention_transfer_loss(students, teachers, weights)


# fp64: the interpreter keeps Python-float kernel arguments (1/(N P), eps) in double; a GPU launch
# types them fp32, so there fp64 agrees with the fp64 reference to about 1e-8 relative only.
FP64_RTOL = 1e-10 if DEVICE == "cpu" else 1e-6
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=1e-7), torch.float64: dict(rtol=FP64_RTOL, atol=1e-14)}

PAIR_SHAPES = {
    "same-size": ((2, 3, 4, 4), (2, 5, 4, 4)),
    "odd-channels-7x7": ((2, 5, 7, 7), (2, 11, 7, 7)),
    "batch-1": ((1, 6, 7, 7), (1, 3, 7, 7)),
    "pooled-8x8-to-4x4": ((2, 3, 8, 8), (2, 5, 4, 4)),
    "pooled-rectangular": ((2, 3, 8, 9), (2, 4, 4, 3)),
    "non-integer-7x7-to-4x4": ((2, 3, 7, 7), (2, 5, 4, 4)),
    "many-channels": ((2, 70, 3, 5), (2, 33, 3, 5)),  # more than one channel block
    "many-positions": ((1, 2, 17, 16), (1, 3, 17, 16)),  # more than one position block
    # sizes of 1 (Triton turns int arguments equal to 1 into constants on a GPU)
    "one-channel": ((2, 1, 4, 4), (2, 1, 4, 4)),
    "width-1": ((2, 3, 5, 1), (2, 2, 5, 1)),
    "pooled-to-1x1": ((2, 3, 2, 2), (2, 4, 1, 1)),
}


# ----------------------------------------------------------------------------------------------
# The reference against a hand formula
# ----------------------------------------------------------------------------------------------


def test_reference_matches_hand_formula():
    """Zagoruyko's at_loss written out element by element, with a 4x4 -> 2x2 box pool."""
    student, teacher = _maps((2, 3, 4, 4), (2, 2, 2, 2), dtype=torch.float64, seed=3)
    student, teacher = student.cpu(), teacher.cpu()
    total = 0.0
    for n in range(2):
        q_s, q_t = [], []
        for i in range(2):
            for j in range(2):
                pooled = [
                    sum(student[n, c, 2 * i + di, 2 * j + dj].item() for di in range(2) for dj in range(2)) / 4
                    for c in range(3)
                ]
                q_s.append(sum(x * x for x in pooled) / 3)
                q_t.append(sum(teacher[n, c, i, j].item() ** 2 for c in range(2)) / 2)
        norm_s = math.sqrt(sum(x * x for x in q_s))
        norm_t = math.sqrt(sum(x * x for x in q_t))
        total += sum((a / norm_s - b / norm_t) ** 2 for a, b in zip(q_s, q_t))
    expected = 0.5 * total / (2 * 4)  # weight 0.5, mean over N * positions
    got = reference.attention_transfer_loss([student], [teacher], [0.5])
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_attention_map_matches_spec_formula():
    student, _ = _maps((3, 5, 4, 6), (3, 1, 1, 1), seed=1)
    expected = F.normalize(student.float().pow(2).mean(1).flatten(1), dim=1)
    torch.testing.assert_close(at.attention_map(student), expected, rtol=0, atol=0)
    assert at.attention_map(student).shape == (3, 24)


# ----------------------------------------------------------------------------------------------
# Triton vs reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shapes", list(PAIR_SHAPES.values()), ids=list(PAIR_SHAPES))
def test_triton_matches_reference(shapes, dtype):
    student, teacher = _maps(*shapes, dtype=dtype)
    loss, grads, teacher_grads, _ = _loss_and_grads(_triton, [student], [teacher], grad_output=-1.7)
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student], [teacher], grad_output=-1.7)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == expected_dtype
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[dtype])
    torch.testing.assert_close(grads[0], ref_grads[0], **TOLERANCE[dtype])
    assert grads[0].dtype == dtype
    assert teacher_grads == [None]


@pytest.mark.parametrize("shapes", [PAIR_SHAPES["odd-channels-7x7"], PAIR_SHAPES["pooled-8x8-to-4x4"]], ids=["7x7", "pooled"])
def test_channels_last_reads_in_place_and_keeps_layout(shapes):
    student, teacher = _maps(*shapes, channels_last=True)
    loss, grads, _, students = _loss_and_grads(_triton, [student], [teacher], grad_output=0.37)
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student.contiguous()], [teacher.contiguous()], grad_output=0.37)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grads[0], ref_grads[0], **TOLERANCE[torch.float32])
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert grads[0].stride() == students[0].stride()


def test_non_contiguous_view_input():
    """A strided view (every other channel) is read through its strides, not copied."""
    student, teacher = _maps((2, 8, 5, 5), (2, 3, 5, 5))
    strided = student[:, ::2]
    assert not strided.is_contiguous()
    loss, grads, _, _ = _loss_and_grads(_triton, [strided], [teacher])
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [strided.contiguous()], [teacher])
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grads[0], ref_grads[0], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_multi_pair_weights_and_grad_output(dtype):
    pairs = [
        _maps((2, 4, 8, 8), (2, 6, 8, 8), dtype=dtype, seed=1),
        _maps((2, 5, 8, 8), (2, 7, 4, 4), dtype=dtype, seed=2),  # fused pool
        _maps((2, 3, 5, 5), (2, 9, 3, 3), dtype=dtype, seed=3),  # torch pool fallback
    ]
    students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
    weights = [1000.0, 0.25, 3.0]
    loss, grads, teacher_grads, _ = _loss_and_grads(_triton, students, teachers, weights, grad_output=-2.5)
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, students, teachers, weights, grad_output=-2.5)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[dtype])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE[dtype])
    assert teacher_grads == [None, None, None]
    # The weights really weigh: the weighted sum of single-pair losses.
    singles = [reference.attention_transfer_loss([s], [t]) for s, t in pairs]
    torch.testing.assert_close(loss, sum(w * l for w, l in zip(weights, singles)), **TOLERANCE[dtype])


def _kernel_launches(fn):
    """(result of fn(), Triton launches per kernel name during it)."""
    before = kernels.KERNEL_LAUNCHES.copy()
    result = fn()
    return result, dict(kernels.KERNEL_LAUNCHES - before)


def test_all_pairs_share_two_forward_launches_and_one_backward_launch():
    """Four pairs of different shapes, layouts and pools (fused 2x2, fused 2x3, torch fallback, same size):
    the whole forward is 2 Triton launches, the whole backward 1, and values and gradients still match."""
    pairs = [
        _maps((2, 5, 8, 8), (2, 7, 4, 4), seed=1),
        _maps((2, 3, 8, 9), (2, 4, 4, 3), seed=2, channels_last=True),
        _maps((2, 3, 5, 5), (2, 9, 3, 3), seed=3),  # torch pool fallback (a torch op, not a Triton launch)
        _maps((3, 40, 3, 5), (3, 70, 3, 5), seed=4),  # several channel blocks: split (forward) and chunked
    ]  # (backward); and another batch size: the pairs' tables are independent
    students = [p[0].detach().clone().requires_grad_(True) for p in pairs]
    teachers = [p[1] for p in pairs]
    weights = [1000.0, 0.25, 3.0, 7.0]
    loss, forward_launches = _kernel_launches(lambda: at.attention_transfer_loss(students, teachers, weights, backend="triton"))
    assert forward_launches == {"_at_energy_kernel": 1, "_at_finalize_kernel": 1}
    grads, backward_launches = _kernel_launches(lambda: torch.autograd.grad(loss, students, torch.tensor(-0.75)))
    assert backward_launches == {"_at_backward_kernel": 1}
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [p[0] for p in pairs], teachers, weights, grad_output=-0.75)
    torch.testing.assert_close(loss.detach(), ref_loss, **TOLERANCE[torch.float32])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE[torch.float32])
    # LAUNCHES keeps counting stage pairs served (what the compiled-step tests compare).
    before = kernels.LAUNCHES.copy()
    at.attention_transfer_loss(students, teachers, weights, backend="triton").backward()
    assert dict(kernels.LAUNCHES - before) == {"attention_transfer_pair_forward": 4, "attention_transfer_pair_backward": 4}


def test_tensor_weights_fall_back_to_per_pair_ops():
    """0-d tensor weights (not foldable into the kernels) still give the reference's value and gradients."""
    pairs = [_maps((2, 3, 4, 4), (2, 5, 2, 2), seed=1), _maps((2, 4, 3, 3), (2, 2, 3, 3), seed=2)]
    weights = [torch.tensor(2.0), torch.tensor(-0.5)]
    loss, grads, _, _ = _loss_and_grads(_triton, [p[0] for p in pairs], [p[1] for p in pairs], weights, grad_output=3.0)
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [p[0] for p in pairs], [p[1] for p in pairs], weights, grad_output=3.0)
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[torch.float32])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE[torch.float32])


def test_backward_issues_no_torch_compute_ops():
    """The backward is the one kernel: autograd materialises no zero gradient for the forward's saved
    coefficient output (that would be a fill kernel per step on a GPU) and nothing else is computed."""
    from torch.profiler import ProfilerActivity, profile

    pairs = [_maps((2, 3, 4, 4), (2, 5, 2, 2), seed=1), _maps((1 + 1, 4, 3, 3), (2, 2, 3, 3), seed=2)]
    students = [p[0].detach().clone().requires_grad_(True) for p in pairs]
    loss = at.attention_transfer_loss(students, [p[1] for p in pairs], backend="triton")
    grad_output = torch.tensor(1.5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(loss, students, grad_output)
    # (The CPU interpreter itself copies kernel arguments around, so copies cannot be checked here.)
    compute = {"aten::zeros", "aten::zero_", "aten::fill_", "aten::mul", "aten::add", "aten::sum", "aten::ones_like"}
    seen = {e.name for e in prof.events()}
    assert seen & compute == set(), seen & compute
    assert "aten::empty_strided" in seen or "aten::empty_like" in seen  # the profile did record the backward


def test_plan_splits_channels_and_caches():
    """The forward plan splits a many-channel map into several channel slices (more programs for small
    maps), the splits cover every channel exactly once, and the plan is cached."""
    at._forward_plan.cache_clear()
    spec_s = ((2, 8, 4, 4), (128, 16, 4, 1), 4, 1, 1)
    spec_t = ((2, 2048, 4, 4), (2048 * 16, 16, 4, 1), 4, 1, 1)
    plan = at._forward_plan(((spec_s, spec_t),), (1.0,), 528, False)
    names = ("channels", "samples", "stride_n", "stride_c", "stride_h", "stride_w", "width_out", "positions",
             "position_blocks", "splits", "split_channels", "program_start", "energy_offset", "inv_channels")
    fields = dict(zip(names, plan.energy_args))
    splits, per_split = fields["splits"][1], fields["split_channels"][1]
    assert splits > 1 and (splits - 1) * per_split < 2048 <= splits * per_split
    assert per_split % plan.energy_meta["BLOCK_C"][1] == 0
    assert plan.energy_grid == fields["program_start"][-1] == 2 * 1 * fields["splits"][0] + 2 * splits
    assert at._forward_plan(((spec_s, spec_t),), (1.0,), 528, False) is plan
    assert at._forward_plan.cache_info().hits == 1


@pytest.mark.parametrize("case", ["both-zero", "student-zero", "teacher-zero"])
@pytest.mark.parametrize("loss_fn", [_triton, _reference], ids=["triton", "reference"])
def test_all_zero_maps_give_finite_loss_and_grads(case, loss_fn):
    student, teacher = _maps((2, 3, 4, 4), (2, 5, 2, 2))
    if case in ("both-zero", "student-zero"):
        student = torch.zeros_like(student)
    if case in ("both-zero", "teacher-zero"):
        teacher = torch.zeros_like(teacher)
    loss, grads, _, _ = _loss_and_grads(loss_fn, [student], [teacher])
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()
    # A zero map normalises to zero, so the loss is the other map's mean square (1/P per sample).
    expected = {"both-zero": 0.0, "student-zero": 1.0 / 4, "teacher-zero": 1.0 / 4}[case]
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
    if case != "teacher-zero":
        assert (grads[0] == 0).all()


def test_zero_student_sample_beside_nonzero_one():
    student, teacher = _maps((3, 4, 6, 6), (3, 2, 6, 6))
    student[1] = 0.0
    loss, grads, _, _ = _loss_and_grads(_triton, [student], [teacher])
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student], [teacher])
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grads[0], ref_grads[0], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("loss_fn", [_triton, _reference], ids=["triton", "reference"])
@pytest.mark.parametrize(
    "shapes", [((2, 3, 4, 4), (2, 2, 2, 2)), ((1, 2, 3, 3), (1, 3, 3, 3)), ((2, 2, 3, 3), (2, 2, 2, 2))], ids=["pooled", "same", "fallback"]
)
def test_gradcheck_fp64(loss_fn, shapes):
    student, teacher = _maps(*shapes, dtype=torch.float64, seed=5)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loss_fn([s], [teacher], [1.5]), (student,), eps=1e-6, atol=1e-8)


def test_teacher_receives_no_gradient_even_when_it_requires_grad():
    student, teacher = _maps((2, 3, 4, 4), (2, 5, 4, 4))
    teacher.requires_grad_(True)
    loss = at.attention_transfer_loss([student.requires_grad_(True)], [teacher], backend="triton")
    (grad_teacher,) = torch.autograd.grad(loss, [teacher], allow_unused=True, materialize_grads=False)
    assert grad_teacher is None


# ----------------------------------------------------------------------------------------------
# Dispatch and torch.func / torch.compile composition
# ----------------------------------------------------------------------------------------------


def _graph_node_names(tensor):
    names, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _ran_triton(loss):
    return any("AttentionTransfer" in name for name in _graph_node_names(loss))


def test_dispatch_rules(monkeypatch):
    student, teacher = _maps((1, 2, 2, 2), (1, 2, 2, 2))
    student.requires_grad_(True)
    monkeypatch.setenv("KD_KERNELS", "triton")
    assert _ran_triton(at.attention_transfer_loss([student], [teacher]))
    monkeypatch.setenv("KD_KERNELS", "reference")
    assert not _ran_triton(at.attention_transfer_loss([student], [teacher]))
    monkeypatch.setenv("KD_KERNELS", "auto")
    assert _ran_triton(at.attention_transfer_loss([student], [teacher])) == (DEVICE == "cuda")
    assert not _ran_triton(at.attention_transfer_loss([student], [teacher], backend="reference"))
    monkeypatch.setenv("KD_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="KD_KERNELS"):
        at.attention_transfer_loss([student], [teacher])
    with pytest.raises(ValueError, match="one teacher map per student map"):
        at.attention_transfer_loss([student], [teacher, teacher], backend="reference")


def test_triton_under_func_grad_and_value():
    student, teacher = _maps((2, 5, 8, 8), (2, 3, 4, 4))

    def loss_of(student_map):
        return 1000.0 * at.attention_transfer_loss([student_map], [teacher], backend="triton")

    grad, value = torch.func.grad_and_value(loss_of)(student)
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student], [teacher], grad_output=1000.0)
    torch.testing.assert_close(value, 1000.0 * ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad, ref_grads[0], **TOLERANCE[torch.float32])


def test_reference_under_compiled_func_grad_and_value():
    student, teacher = _maps((2, 5, 8, 8), (2, 3, 4, 4))
    weight = 1000.0

    def loss_of(student_map, teacher_map):
        return at.attention_transfer_loss([student_map], [teacher_map], [weight], backend="reference")

    compiled = torch.compile(torch.func.grad_and_value(loss_of), fullgraph=True)
    grad, value = compiled(student, teacher)
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student], [teacher], [weight])
    torch.testing.assert_close(value, ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad, ref_grads[0], **TOLERANCE[torch.float32])


def _compiled_autograd_step(student, teacher, backend):
    """One compiled step that differentiates with torch.autograd.grad (the form that keeps custom backwards)."""

    def step(leaf):  # the leaf arrives requiring grad: torch 2.11 refuses requires_grad_() inside the graph
        with torch.enable_grad():
            loss = at.attention_transfer_loss([leaf], [teacher], [1000.0], backend=backend)
            (grad,) = torch.autograd.grad(loss, [leaf])
        return grad, loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        return torch.compile(step, fullgraph=True)(student.detach().clone().requires_grad_(True))


def test_triton_inside_torch_compile():
    """The kernels are opaque ops with fake shapes, so Inductor calls them (here: the interpreter)."""
    student, teacher = _maps((2, 5, 8, 8), (2, 3, 4, 4))
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student], [teacher], [1000.0])
    grad, value = _compiled_autograd_step(student, teacher, "triton")
    torch.testing.assert_close(value, ref_loss, **TOLERANCE[torch.float32])
    torch.testing.assert_close(grad, ref_grads[0], **TOLERANCE[torch.float32])
    # and the classic compiled forward + eager .backward()
    leaf = student.clone().requires_grad_(True)
    loss = torch.compile(lambda s: at.attention_transfer_loss([s], [teacher], [1000.0], backend="triton"), fullgraph=True)(leaf)
    loss.backward()
    torch.testing.assert_close(leaf.grad, ref_grads[0], **TOLERANCE[torch.float32])


def test_triton_refuses_compiled_func_grad():
    """torch 2.14.1 drops custom backwards in compile(func.grad) (pytorch#193279): fail loudly, not wrongly."""
    student, teacher = _maps((1, 2, 4, 4), (1, 3, 4, 4))

    def loss_of(student_map):
        return at.attention_transfer_loss([student_map], [teacher], backend="triton")

    with pytest.raises(Exception, match="193279"):
        torch.compile(torch.func.grad_and_value(loss_of), fullgraph=True)(student)


def test_compiling_under_torch_func_is_detected_at_trace_time():
    """The switch that sends ``auto`` to the reference in compile(func.grad) and nowhere else."""
    from kernels._dispatch import compiling_under_torch_func

    def flagged_sum(x):
        flag = 1.0 if compiling_under_torch_func() else 0.0
        return (x * flag).sum()

    x = torch.ones(3)
    assert torch.compile(torch.func.grad(flagged_sum), fullgraph=True)(x).tolist() == [1.0, 1.0, 1.0]
    assert torch.func.grad(flagged_sum)(x).tolist() == [0.0, 0.0, 0.0]
    leaf = x.clone().requires_grad_(True)
    torch.compile(flagged_sum, fullgraph=True)(leaf).backward()
    assert leaf.grad.tolist() == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# GPU only: half precision (the interpreter mis-computes bf16) and the compiled Triton path
# ----------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "shapes",
    [((8, 64, 32, 32), (8, 256, 32, 32)), ((8, 128, 16, 16), (8, 512, 8, 8)), ((4, 24, 7, 7), (4, 40, 7, 7))],
    ids=["cifar", "pooled", "7x7"],
)
def test_half_precision_matches_fp32_reference(dtype, channels_last, shapes):
    student, teacher = _maps(*shapes, dtype=dtype, channels_last=channels_last)
    loss, grads, _, _ = _loss_and_grads(_triton, [student], [teacher], grad_output=1000.0)
    # The reference on the same half inputs also accumulates in fp32, but rounds its intermediates (the
    # pooled teacher map, the normalised maps) to the half type; the kernel keeps them in fp32 and rounds
    # once. So both are compared with the truth: the fp32 reference on the same (upcast) values.
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, [student], [teacher], grad_output=1000.0)
    true_loss, true_grads, _, _ = _loss_and_grads(_reference, [student.float()], [teacher.float()], grad_output=1000.0)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(loss, true_loss, rtol=1e-4, atol=1e-7)
    truth = true_grads[0].float()
    kernel_error = (grads[0].float() - truth).norm()
    reference_error = (ref_grads[0].float() - truth).norm()
    rounding = torch.finfo(dtype).eps * truth.norm()  # one rounding of every element to the half type
    assert kernel_error <= max(1.5 * reference_error, rounding), (kernel_error.item(), reference_error.item())
    # and elementwise: within a few half-type ulps of the largest gradient
    torch.testing.assert_close(grads[0].float(), truth, rtol=2 * torch.finfo(dtype).eps,
                               atol=4 * torch.finfo(dtype).eps * truth.abs().max().item())


@gpu_only
@pytest.mark.gpu
def test_compiled_train_step_shapes_on_gpu():
    """CIFAR-scale pairs on the GPU: compiled autograd.grad runs Triton; compiled func.grad (auto) stays correct."""
    pairs = [_maps((16, 64, 32, 32), (16, 256, 32, 32), seed=1), _maps((16, 128, 16, 16), (16, 512, 8, 8), seed=2)]
    students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
    weights = [1000.0, 500.0]
    ref_loss, ref_grads, _, _ = _loss_and_grads(_reference, students, teachers, weights)

    def step(leaves, backend):  # leaves requiring grad: torch 2.11 refuses requires_grad_() in the graph
        with torch.enable_grad():
            loss = at.attention_transfer_loss(leaves, teachers, weights, backend=backend)
            grads = torch.autograd.grad(loss, leaves)
        return grads, loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        leaves = [s.detach().clone().requires_grad_(True) for s in students]
        grads, value = torch.compile(step, fullgraph=True)(leaves, "triton")
    torch.testing.assert_close(value, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)

    def loss_of(student_maps):
        return at.attention_transfer_loss(student_maps, teachers, weights, backend="auto")

    grads, value = torch.compile(torch.func.grad_and_value(loss_of), fullgraph=True)(students)
    torch.testing.assert_close(value, ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Every kernel (AT and IB) through the real compiler, no GPU needed
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_kernel_specialisation_compiles_for_hopper_without_spills():
    """The interpreter is lenient; ``python -m kernels aot-check`` compiles each launch to an sm_90 cubin.

    No spills, and at most 128 registers per thread (occupancy for the bandwidth-bound AT kernels) with
    Triton >= 3.8; Triton 3.6 (an H200 machine's torch 2.11 stack) allocates 168 to the 2x2-pooled AT
    backward specialisations (no spills), so older compilers get a cap of 176.
    """
    pytest.importorskip("triton.backends.nvidia.compiler")
    import triton

    cap = 128 if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8) else 176
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "kernels", "aot-check", "--fail-on-spill", "--max-registers", str(cap)],
        cwd=Path(__file__).resolve().parents[1], env=environment, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    kernels_seen = {line.split()[0] for line in result.stdout.splitlines()[1:] if line.startswith("  _")}
    assert kernels_seen == {
        "_at_energy_kernel", "_at_finalize_kernel", "_at_backward_kernel",
        "_student_loss_forward_kernel", "_student_loss_backward_kernel",
        "_reparam_kl_forward_kernel", "_reparam_kl_backward_kernel",
    }  # fmt: skip
