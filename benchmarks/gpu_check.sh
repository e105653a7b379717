#!/usr/bin/env bash
# Check, then time, the Pallas kernels on one accelerator (issues 6 and 16), in one 8-minute run:
#   1. the kernel tests, which run the kernels compiled on this machine's accelerator
#      (tests/conftest.py: kernel_interpret), against the XLA reference (TPU-backend cases are
#      left to the CPU suite, which interprets them);
#   2. benchmarks/kernels.py: correctness at larger shapes, then forward and forward+backward
#      timings of linear and window attention against XLA, cuDNN and flash-linear-attention,
#      with the roofline fraction;
#   3. benchmarks/ssm_kernels.py: SSD and the selective scan, Pallas vs XLA vs mamba_ssm's
#      kernels where mamba_ssm is importable.
# Every phase has its own time limit; the exit status is 1 if any phase failed.
#
#   bash benchmarks/gpu_check.sh                      # the full run: tables on stdout, JSON in
#                                                     # benchmarks/results/{kernels,ssm_kernels}.json
#   bash benchmarks/gpu_check.sh --quick              # CPU smoke run (interpret mode)
#   bash benchmarks/gpu_check.sh --seq_lens=2048      # extra flags go to benchmarks/kernels.py
#
# Environment: PYTHON (default: .venv/bin/python, else python3); TEST_TIMEOUT (default 150 s),
# KERNELS_BUDGET (190 s of timings), SSM_BUDGET (80 s); XLA_PYTHON_CLIENT_MEM_FRACTION (default
# 0.6, leaving room for PyTorch when fla or mamba_ssm run).
# Record measured results in BENCHMARKS.md with the command, the machine and the date.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
KERNELS_BUDGET=${KERNELS_BUDGET:-190}
SSM_BUDGET=${SSM_BUDGET:-80}
QUICK=()
for argument in "$@"; do
  if [[ "$argument" == "--quick" ]]; then QUICK=(--quick); fi
done

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" - <<'EOF'
import jax
print(f"JAX {jax.__version__}, platform {jax.default_backend()}, devices {jax.devices()}")
for peer in ("fla", "mamba_ssm"):
    try:
        import torch
        module = __import__(peer)
        print(f"PyTorch {torch.__version__}, {peer} {getattr(module, '__version__', '?')}: timed")
    except Exception as error:
        print(f"{peer} not timed ({type(error).__name__}: {error})")
EOF

status=0
echo
echo "== 1. kernel tests (compiled on this accelerator; TPU-backend cases skipped)"
KERNEL_TESTS=(
  tests/test_pallas_linear_attention.py tests/test_pallas_decay.py
  tests/test_pallas_feature_maps.py tests/test_pallas_window_attention.py
  tests/test_pallas_selective_scan.py tests/test_ssm_models_with_kernels.py
  tests/test_ssd.py::test_the_kernel_reads_b_and_c_by_group_and_matches_xla
)
if [[ ${#QUICK[@]} -gt 0 ]]; then KERNEL_TESTS=(tests/test_pallas_selective_scan.py); fi
# (the mesh test simulates 8 CPU devices: it interprets, so the CPU suite covers it)
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider -k "not tpu and not mesh" \
  "${KERNEL_TESTS[@]}" || { echo "FAILED (or over ${TEST_TIMEOUT} s): kernel tests"; status=1; }

echo
echo "== 2. linear and window attention: checks and timings"
timeout $((KERNELS_BUDGET + 60)) "$PYTHON" benchmarks/kernels.py --time_budget="$KERNELS_BUDGET" \
  "$@" || { echo "FAILED: benchmarks/kernels.py"; status=1; }

echo
echo "== 3. SSD and the selective scan: timings"
timeout $((SSM_BUDGET + 40)) "$PYTHON" benchmarks/ssm_kernels.py --time_budget="$SSM_BUDGET" \
  "${QUICK[@]}" || { echo "FAILED: benchmarks/ssm_kernels.py"; status=1; }
exit "$status"
