#!/usr/bin/env bash
# The full comparison on one GPU: rnnjax, Flax, Equinox (if installed), PyTorch/cuDNN and
# causal attention, T = 2^6..2^14, 5 cells, forward and forward+backward; under 8 minutes
# (the gpu preset stops measuring after 6.5 and reports what it skipped).
#
#   bash benchmarks/gpu.sh                      # from the repository root, on the GPU machine
#   bash benchmarks/gpu.sh --tiny               # check it anywhere, CPU included (seconds)
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --cells lstm,gru
#
# Extra arguments go to `python -m benchmarks.run`. Results: benchmarks/results/<device>-gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

# rnnjax importable without touching the machine's dependencies (no network there).
"$PY" -c "import rnnjax" >/dev/null 2>&1 || "$PY" -m pip install --no-deps -e . >/dev/null 2>&1 || true
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the GPU: JAX allocates as needed instead of 75% upfront.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not found: the suite runs on whatever device JAX finds"
"$PY" - <<'PY' || true
import jax
print("jax", jax.__version__, jax.devices())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.version.cuda,
          "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
except ImportError:
    print("torch not installed: the torch system is skipped")
PY

# A hard stop just under 8 minutes; results are written after every (T, cell) anyway.
exec timeout -s INT 450 "$PY" -m benchmarks.run --preset gpu "$@"
