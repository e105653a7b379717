#!/usr/bin/env bash
# Check, then time, the Pallas kernels on one accelerator (issue 6): correctness of every kernel
# (forward and gradients) against the XLA reference first, then forward and forward+backward
# timings against XLA, cuDNN and flash-linear-attention, with the roofline fraction.
# Meant to finish in under 8 minutes on one GPU (H100/H200 class).
#
#   bash benchmarks/gpu_check.sh                      # the full run: table on stdout, JSON in
#                                                     # benchmarks/results/kernels.json
#   bash benchmarks/gpu_check.sh --quick              # CPU smoke run (interpret mode, ~1 minute)
#   bash benchmarks/gpu_check.sh --seq_lens=2048      # any benchmarks/kernels.py flag
#
# Environment: PYTHON (default: .venv/bin/python, else python3); CHECK_TIMEOUT seconds (default
# 480); XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.6, leaving room for PyTorch when fla runs).
# Record measured results in BENCHMARKS.md with the command, the machine and the date.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" - <<'EOF'
import jax
print(f"JAX {jax.__version__}, platform {jax.default_backend()}, devices {jax.devices()}")
try:
    import torch, fla  # noqa: F401
    print(f"PyTorch {torch.__version__}, fla {getattr(fla, '__version__', '?')}: peers will be timed")
except Exception as error:
    print(f"flash-linear-attention not timed ({type(error).__name__}: {error})")
EOF

exec timeout "${CHECK_TIMEOUT:-480}" "$PYTHON" benchmarks/kernels.py "$@"
