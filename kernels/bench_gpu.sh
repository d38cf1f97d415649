#!/usr/bin/env bash
# GPU check of the fused kernels: the kernel tests on the real compiler, then the full benchmark.
#
#   bash kernels/bench_gpu.sh OUTDIR          # e.g. on an NVIDIA H200
#   BENCH_ARGS="--dtypes fp32 --budget 0.2" bash kernels/bench_gpu.sh OUTDIR   # a shorter run
#   AOT=0 TESTS_TIMEOUT=90 BENCH_TIMEOUT=90 STEP_TIMEOUT=150 SMOKE_TIMEOUT=120 TEACHERS_TIMEOUT=30 \
#     bash kernels/bench_gpu.sh OUTDIR
#       (about 8 minutes: skip the AOT register check, stop each later part after so many seconds: for a
#        time-boxed machine; every part writes as it goes, so a stopped part still leaves its rows)
#
# Needs no network: torch and triton from the machine, the project's pure-Python dependencies from the
# wheel folder .whl/ when they are missing (prepare it where a registry is reachable, see the README:
#   pip download --only-binary :all: -d .whl tyro einops safetensors tqdm pytest).
# Runs, in this order (most valuable first, so that a time box cuts the least useful): the AOT register check,
# the kernel tests and the compiled-step tests (Triton kernels inside the compiled train step), the kernel
# benchmark (per row: host-inclusive and CUDA-graph replay times, L2 flushed before each of >= 100 repetitions,
# MB moved, copy and read-only-sum baselines, Triton launches per call; BENCH_ARGS="--no-cudagraph" skips the
# graph timings), the distillation step benchmark (Hinton KD, IB-KD stage B and AT, batch 64 and 256:
# compiled+triton vs compiled+reference vs eager, and both compiled ones replayed as CUDA graphs; per row also
# Triton launches per step and the losses' share of the step, and the peer CIFAR-100 run projected from KD at
# batch 64; STEP_BENCH_ARGS replaces its arguments), the pipeline smoke (a few steps of every part of the
# default IB-KD pipeline: resnet152 + efficientnet_b2 fine-tuning, feature cache, stage A, stage B, bf16 and
# compiled, with the full CIFAR-100 run's wall time projected; SMOKE_ARGS adds arguments, e.g. "--compile off"
# to reach every part within a short SMOKE_TIMEOUT, eager rates being a lower bound) and the teachers' benchmark.
# Writes into OUTDIR: env.txt (GPU, driver, versions), aot-check.log, pytest.log, bench.stderr.log,
# bench.md and bench.csv (one row per measurement), bench_distill.md/.csv and bench_distill.log,
# smoke_pipeline.md and smoke_pipeline.log, bench_teachers.log.
# Exits non-zero when a test or a correctness gate fails; later parts still run so every log comes back.
set -uo pipefail

OUTDIR=${1:?usage: bash kernels/bench_gpu.sh OUTDIR}
mkdir -p "$OUTDIR"
cd "$(dirname "$0")/.." || exit 2
# The interpreter would replace the compiler: everything here must run the real kernels.
unset TRITON_INTERPRET KD_KERNELS
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$(python -c 'import importlib.util as u; print(" ".join(m for m in ("tyro", "einops", "safetensors", "tqdm", "pytest") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  if [ -d .whl ]; then
    # shellcheck disable=SC2086  # a list of package names
    python -m pip install -q --no-index --find-links .whl $missing || echo "could not install $missing from .whl" >&2
  else
    echo "missing Python packages ($missing) and no .whl/ folder: see kernels/bench_gpu.sh's header" >&2
  fi
fi

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

aot_rc=0
if [ "${AOT:-1}" != 0 ]; then
  python -m kernels aot-check --fail-on-spill --max-registers 128 2>&1 | tee "$OUTDIR/aot-check.log"
  aot_rc=${PIPESTATUS[0]}
fi

# timeout 0 = no limit
timeout "${TESTS_TIMEOUT:-0}" python -m pytest tests/test_kernels_at.py tests/test_kernels_ib.py \
  tests/test_compiled_kernels.py -q -rs --durations=10 -p no:cacheprovider 2>&1 | tee "$OUTDIR/pytest.log"
tests_rc=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout "${BENCH_TIMEOUT:-0}" python -m kernels.bench --out "$OUTDIR" ${BENCH_ARGS:-} 2> "$OUTDIR/bench.stderr.log"
bench_rc=$?

STEP_BENCH_ARGS=${STEP_BENCH_ARGS:---methods kd ibkd_stage_b at --batch-sizes 64 256 --providers compiled+triton \
compiled+reference eager+reference compiled+triton+cudagraphs compiled+reference+cudagraphs}
# shellcheck disable=SC2086  # STEP_BENCH_ARGS is a list of flags
timeout "${STEP_TIMEOUT:-0}" python launch.py recipes.bench_distill --out "$OUTDIR" $STEP_BENCH_ARGS 2>&1 \
  | tee "$OUTDIR/bench_distill.log"
step_rc=${PIPESTATUS[0]}

# The default pipeline, a few steps per part (synthetic CIFAR-100-shaped data, no download), and its projection
# shellcheck disable=SC2086  # SMOKE_ARGS is a list of flags
timeout "${SMOKE_TIMEOUT:-0}" python launch.py recipes.smoke_pipeline --out "$OUTDIR" ${SMOKE_ARGS:-} 2>&1 \
  | tee "$OUTDIR/smoke_pipeline.log"
smoke_rc=${PIPESTATUS[0]}

# What the frozen teachers cost in a KD step and the levers (BN folding, channels-last, shared outputs)
timeout "${TEACHERS_TIMEOUT:-0}" python launch.py recipes.bench_teachers --teachers resnet32x4 wrn_40_2 --device cuda 2>&1 \
  | tee "$OUTDIR/bench_teachers.log"
teachers_rc=${PIPESTATUS[0]}

echo "aot-check rc=$aot_rc  tests rc=$tests_rc  bench rc=$bench_rc  step bench rc=$step_rc  smoke rc=$smoke_rc" \
  "teachers bench rc=$teachers_rc" \
  "(non-zero bench rc: a correctness gate failed; 124: stopped by its timeout)" | tee -a "$OUTDIR/env.txt"
[ "$aot_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$step_rc" -eq 0 ] && [ "$smoke_rc" -eq 0 ] \
  && [ "$teachers_rc" -eq 0 ]
