"""Test environment: the Triton interpreter on machines without CUDA (must be set before triton is imported),
and few CPU threads so the suite behaves on a 2-core machine."""

import os

os.environ.setdefault("KD_TEST", "1")
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
