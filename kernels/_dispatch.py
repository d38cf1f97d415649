"""Backend selection shared by the fused kernels, and the one place that imports Triton.

``backend=None`` reads the ``KD_KERNELS`` environment variable (``auto`` by default):

* ``auto``      -- Triton for CUDA tensors, the pure-torch reference otherwise;
* ``triton``    -- always Triton (CPU tensors work only under ``TRITON_INTERPRET=1``, which Triton
  reads when a kernel is defined, so set it before importing :mod:`kernels`);
* ``reference`` -- always the pure-torch reference (``kernels.reference``).

One exception to ``auto``: code traced by ``torch.compile`` inside a torch.func transform gets the
reference (and ``triton`` raises), because torch 2.14.1 silently drops custom backwards there
(pytorch/pytorch#193279; see :func:`compiling_under_torch_func`).

The choice depends only on the backend string, tensor devices and trace-time state, all static
under ``torch.compile``, so dispatching never adds a guard on a tensor value or a host sync.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

try:  # pyproject installs Triton on Linux only; elsewhere the reference path still works.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without Triton

    class _TritonMissing:
        """Lets the kernel modules define their ``@triton.jit`` functions without Triton installed."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_options):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError(
                f"Triton is not installed, so triton.{name} is unavailable; "
                "use backend='reference' (or KD_KERNELS=reference)"
            )

    triton = _TritonMissing()
    tl = _TritonMissing()
    HAS_TRITON = False

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "KERNEL_LAUNCHES",
    "LAUNCHES",
    "count_launch",
    "interpreting",
    "launch",
    "resolve_backend",
    "tl",
    "triton",
]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "KD_KERNELS"

# Host-side count of executions per op (forward and backward separately). The launchers run outside
# any traced graph (they are opaque dispatcher ops), so this counts real executions, compiled or eager;
# tests use it to prove which path a training step took. One AT op call serves every stage pair of a
# loss, and adds the number of pairs it served (so "attention_transfer_pair_forward" still counts pairs).
LAUNCHES: Counter[str] = Counter()

# Host-side count of Triton kernel launches (``kernel[grid](...)`` calls), keyed by kernel name: what
# the launch-count tests and the benchmark's "launches per call" read. Torch ops a launcher may issue
# besides (``torch.empty`` allocations launch nothing) are not Triton launches and are not counted.
KERNEL_LAUNCHES: Counter[str] = Counter()


def count_launch(op: str, amount: int = 1) -> None:
    LAUNCHES[op] += amount


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, counted in :data:`KERNEL_LAUNCHES`."""
    KERNEL_LAUNCHES[getattr(kernel, "fn", kernel).__name__] += 1
    kernel[grid](*args, **kwargs)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter.

    Triton fixes interpret-or-compile when ``triton.language`` is imported and when each kernel is
    defined, so setting ``TRITON_INTERPRET=1`` after that has no effect; ask Triton itself.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def compiling_under_torch_func() -> bool:
    """True while ``torch.compile`` traces code that runs inside a torch.func transform (grad, vjp...).

    There, torch 2.14.1's Dynamo inlines an autograd.Function's forward and silently drops its custom
    backward (pytorch/pytorch#193279): the transform then differentiates the forward's ops by their
    default rules, and our kernel ops have none, so the gradients would be wrong without an error.
    Both checks are answered at trace time, so this adds no guard on tensor values and no sync.
    """
    return torch.compiler.is_compiling() and _functorch_depth() > 0


@torch.compiler.assume_constant_result
def _functorch_depth() -> int:
    """The number of active torch.func transforms, read for real while Dynamo traces: torch 2.11's Dynamo
    cannot trace this builtin (a graph break, an error under ``fullgraph=True``); called as a constant, it
    answers at trace time on every version, where the transforms being traced are already entered."""
    return int(torch._C._functorch.get_dynamic_layer_stack_depth())


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op whose inputs are ``tensors``.

    ``auto`` also picks the reference inside ``torch.compile(torch.func.grad(...))`` (see
    :func:`compiling_under_torch_func`): there the reference's plain torch ops are differentiated
    correctly and fused by Inductor. ``triton`` refuses that combination with an explanation.
    """
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "auto":
        use_triton = on_cuda and HAS_TRITON and not compiling_under_torch_func()
        return "triton" if use_triton else "reference"
    # requested == "triton"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' was requested but Triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "in the environment before anything imports triton (setting it later has no effect); "
            "or use backend='reference' (or 'auto') on CPU"
        )
    if compiling_under_torch_func():
        raise RuntimeError(
            "backend='triton' inside torch.compile(torch.func.grad/grad_and_value/vjp(...)): torch's "
            "Dynamo drops the kernels' custom backward there (pytorch/pytorch#193279), which would give "
            "wrong gradients. Use backend='auto' (the reference, fused by Inductor, in that case), or "
            "differentiate with torch.autograd.grad inside the compiled function "
            "(torch._dynamo.config.trace_autograd_ops = True), or torch.func.grad without torch.compile."
        )
    return "triton"
