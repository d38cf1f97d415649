"""Backend selection shared by the fused kernels, and the one place that imports Triton.

``backend=None`` reads the ``KD_KERNELS`` environment variable (``auto`` by default):

* ``auto``      -- Triton for CUDA tensors, the pure-torch reference otherwise;
* ``triton``    -- always Triton (CPU tensors work only under ``TRITON_INTERPRET=1``, which Triton
  reads when a kernel is defined, so set it before importing :mod:`kernels`);
* ``reference`` -- always the pure-torch reference (``kernels.reference``).

The choice depends only on the backend string and on tensor devices, both static under
``torch.compile``, so dispatching never adds a guard on a tensor value or a host sync.
"""

from __future__ import annotations

import contextlib
import os

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

__all__ = ["BACKENDS", "HAS_TRITON", "interpreting", "kernel_operand", "outside_torch_func", "resolve_backend", "tl", "triton"]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "KD_KERNELS"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter.

    Triton fixes interpret-or-compile when ``triton.language`` is imported and when each kernel is
    defined, so setting ``TRITON_INTERPRET=1`` after that has no effect; ask Triton itself.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"reference"`` for an op whose inputs are ``tensors``."""
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if requested == "auto":
        return "triton" if (on_cuda and HAS_TRITON) else "reference"
    # requested == "triton"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' was requested but Triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "in the environment before anything imports triton (setting it later has no effect); "
            "or use backend='reference' (or 'auto') on CPU"
        )
    return "triton"


@contextlib.contextmanager
def outside_torch_func():
    """Run a hand-written backward on plain tensors, outside torch.func's transform levels.

    Under ``torch.func.grad``/``grad_and_value`` an autograd.Function's ``backward`` receives its
    saved tensors and output gradients wrapped at the transform's level, and every tensor it
    allocates is wrapped too; a wrapper has no storage that a Triton kernel could be handed. Our
    backwards are explicit formulas that are never differentiated again (first-order training), so
    running them on the unwrapped tensors (see :func:`kernel_operand`) with torch.func's dispatch
    switched off is exact; torch.func lifts the plain gradients back to its level. Under
    ``torch.compile`` the tensors are traced, not wrapped, and nothing is changed.
    """
    if torch.compiler.is_compiling():
        yield
        return
    with torch._C._DisableFuncTorch():
        yield


def kernel_operand(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The plain tensor under torch.func's grad-tracking wrappers (see :func:`outside_torch_func`)."""
    if tensor is None or torch.compiler.is_compiling():
        return tensor
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor) and functorch.is_gradtrackingtensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor
