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

__all__ = ["BACKENDS", "HAS_TRITON", "interpreting", "resolve_backend", "tl", "triton"]

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "KD_KERNELS"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before Triton is "
            "imported; use backend='reference' (or 'auto') on CPU"
        )
    return "triton"
