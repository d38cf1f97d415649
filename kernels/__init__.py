"""Fused Triton kernels for the AT and IB losses, with their pure-torch references.

Public API (Triton on CUDA, the reference elsewhere; ``backend=`` or ``$KD_KERNELS`` overrides):

* :func:`attention_map`, :func:`attention_transfer_loss`  (``kernels.at``)
* :func:`ib_reparam_kl`, :func:`precision_clamp_value`, :func:`ib_student_loss`  (``kernels.ib``)

``kernels.reference`` holds the reference functions under the same names (without ``backend``).
"""

from .at import attention_map, attention_transfer_loss, attention_transfer_pair_loss

__all__ = [
    "attention_map",
    "attention_transfer_loss",
    "attention_transfer_pair_loss",
]
