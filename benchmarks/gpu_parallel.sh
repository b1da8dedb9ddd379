#!/usr/bin/env bash
# rj.scan's methods on one GPU in under 8 minutes: sequential, associative, chunked and "auto"
# for minGRU and LRU over T = 1024 .. 65536, and DEER / quasi-DEER for a GRU with hidden 16,
# forward and forward+backward. Writes benchmarks/results/gpu_parallel_<UTC time>.{json,md,png}
# and the "auto" table those numbers imply (.auto_table.txt).
#
#   bash benchmarks/gpu_parallel.sh                  # from anywhere, on the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/gpu_parallel.sh --T 1024,4096   # extra sweep options
#
# Needs a jax that sees a GPU. Targets from the issue, read off the Markdown's speed-up
# table (fwd+bwd): minGRU/LRU associative or chunked >= 10x sequential at T >= 4096;
# GRU hidden 16 newton(quasi-deer) >= 5x sequential at T >= 16384.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"     # rnnjax from this checkout, installed or not
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}   # one GPU
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c 'import jax, sys; print("jax", jax.__version__, jax.devices()); sys.exit(0 if jax.default_backend() == "gpu" else "no GPU for jax")' || exit 1

OUT=benchmarks/results/gpu_parallel_$(date -u +%Y%m%dT%H%M%SZ)
# The preset stops measuring after 360 s (--budget-s) and writes what it has (also after
# every T, so the backstop timeout loses at most one T).
timeout -s INT 450 "$PY" benchmarks/parallel_sweep.py --preset gpu --out "$OUT" "$@"
status=$?
[ -f "$OUT.json" ] && "$PY" benchmarks/parallel_sweep.py --auto-table "$OUT.json" | tee "$OUT.auto_table.txt"
[ -f "$OUT.md" ] && grep -E "^\| (mingru|lru|gru:16) \| fwd\+bwd" "$OUT.md"
exit $status
