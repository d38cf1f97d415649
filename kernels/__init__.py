"""Fused Triton kernels for the AT and IB losses, with their pure-torch references (SPEC 8).

Public API (Triton for CUDA tensors, the reference elsewhere; ``backend=`` or ``$KD_KERNELS``
overrides, see :mod:`kernels._dispatch`):

* :func:`attention_map`, :func:`attention_transfer_loss` (``kernels.at``)
* :func:`ib_reparam_kl`, :func:`precision_clamp_value`, :func:`ib_student_loss` (``kernels.ib``)

:mod:`kernels.reference` holds the pure-torch references under the same names (without the
``backend`` keyword); the CPU path, the tests and the benchmark all import them from there.
:data:`LAUNCHES` counts executions per op (what tests read to prove a path ran; the AT ops add the
number of stage pairs each call served); :data:`KERNEL_LAUNCHES` counts Triton kernel launches per
kernel (AT: 2 forward launches and 1 backward launch for all pairs of a loss together).
"""

from ._dispatch import BACKENDS, KERNEL_LAUNCHES, LAUNCHES
from .at import attention_map, attention_transfer_loss, attention_transfer_pair_loss
from .ib import ib_reparam_kl, ib_student_loss, precision_clamp_value

__all__ = [
    "BACKENDS",
    "KERNEL_LAUNCHES",
    "LAUNCHES",
    "attention_map",
    "attention_transfer_loss",
    "attention_transfer_pair_loss",
    "ib_reparam_kl",
    "ib_student_loss",
    "precision_clamp_value",
]
