#!/usr/bin/env bash
# GPU check of the fused kernels: the kernel tests on the real compiler, then the full benchmark.
#
#   bash kernels/bench_gpu.sh OUTDIR          # e.g. on an NVIDIA H200
#   BENCH_ARGS="--dtypes fp32 --budget 0.2" bash kernels/bench_gpu.sh OUTDIR   # a shorter run
#
# Writes into OUTDIR: env.txt (GPU, driver, versions), aot-check.log, pytest.log, bench.stderr.log,
# bench.md and bench.csv (one row per measurement). Exits non-zero when a test or a correctness gate
# fails; the benchmark still runs after failing tests so that both logs come back.
set -uo pipefail

OUTDIR=${1:?usage: bash kernels/bench_gpu.sh OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.." || exit 2
# The interpreter would replace the compiler: everything here must run the real kernels.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || echo "nvidia-smi unavailable"
  python - <<'EOF'
import platform, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton_version}")
print(f"cuda available: {torch.cuda.is_available()}", torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUTDIR/env.txt"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "no CUDA device visible: this script is for a GPU machine (CPU: pytest + python -m kernels.bench --quick)" >&2
  exit 2
}

python -m kernels aot-check --fail-on-spill --max-registers 128 2>&1 | tee "$OUTDIR/aot-check.log"
aot_rc=${PIPESTATUS[0]}

python -m pytest tests/test_kernels_at.py tests/test_kernels_ib.py -q -rs --durations=10 2>&1 | tee "$OUTDIR/pytest.log"
tests_rc=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
python -m kernels.bench --out "$OUTDIR" ${BENCH_ARGS:-} 2> "$OUTDIR/bench.stderr.log"
bench_rc=$?

echo "aot-check rc=$aot_rc  tests rc=$tests_rc  bench rc=$bench_rc (non-zero bench rc: a correctness gate failed)" | tee -a "$OUTDIR/env.txt"
[ "$aot_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
