"""Test environment: the Triton interpreter on machines without CUDA (must be set before triton is imported),
few CPU threads so the suite behaves on a 2-core machine, and the ``requires_fashion_mnist`` marker."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("KD_TEST", "1")
os.environ.setdefault("MKL_CBWR", "COMPATIBLE,STRICT")  # as launch.py sets them: bit-exact resumes (before torch)
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

# Debian's dataset-fashion-mnist package (kd.data reads it from here). CI installs it, so there the marked
# tests always run; on a fresh machine without it they are skipped and pytest's summary (-rs) says why.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_fashion_mnist") is None:
        return
    if not all((FASHION_MNIST_DIR / name).is_file() for name in FASHION_MNIST_FILES):
        pytest.skip(f"needs Debian's dataset-fashion-mnist package ({FASHION_MNIST_DIR} is absent): "
                    f"sudo apt-get install dataset-fashion-mnist")
