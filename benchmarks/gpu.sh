#!/usr/bin/env bash
# rnnjax against PyTorch/cuDNN (and Flax, Equinox, causal attention) on your own GPU:
#   1. set-up: rnnjax from this checkout; JAX and PyTorch share the GPU (JAX allocates as it needs
#      instead of 75% upfront); prints the GPU, jax, torch and cuDNN; stops if JAX sees no GPU.
#   2. check: the rnnjax variants of the comparison and rj.Kernel() (LSTM, GRU, Elman) against
#      rj.scan's default, outputs and gradients at T=64 (python -m benchmarks.run --check); stops
#      when one fails or differs by more than CHECK_TOL (default 1e-3).
#   3. the comparison: python -m benchmarks.run --preset gpu, your arguments last (T = 2^6..2^14,
#      5 cells, fwd and fwd+bwd; the preset stops measuring after 6.5 minutes: --max-minutes 0
#      lifts that).
#   4. matrix-state recurrences: python -m benchmarks.linear_attention --preset gpu (gla, mlstm,
#      delta rule, gated delta rule, rwkv7: Sequential, Chunked, causal attention, fla / xLSTM
#      Triton kernels; LA=0 skips it).
# Output (git-ignored): bench-results/gpu-check/ and bench-results/<gpu>-gpu/ in the repository
# root, or --out DIR for the comparison.
#
#   bash benchmarks/gpu.sh                                  # from anywhere in the checkout
#   bash benchmarks/gpu.sh --cells lstm gru --lengths 1024 4096
#   bash benchmarks/gpu.sh --tiny      (or TINY=1)         # anywhere, CPU included: checks the script
#   CHECK=0 bash benchmarks/gpu.sh                          # skip step 2
#   PYTHON=/path/to/python bash benchmarks/gpu.sh          # default: .venv/bin/python, else python3
#
# Needs jax with CUDA (e.g. pip install -U "jax[cuda12]") and, for the peer, PyTorch with CUDA;
# `pip install -e ".[bench]"` adds Flax and Equinox. A missing peer is skipped with a note.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"   # rnnjax from this checkout, installed or not
export XLA_PYTHON_CLIENT_PREALLOCATE=false
TINY=${TINY:-}
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY=1; done
TINY_ARGS=()
# --tiny: the suite's tiny shapes, LSTM only, one length; your arguments still win.
[ -n "$TINY" ] && TINY_ARGS=(--tiny --cells lstm --lengths 16)

# 1. Set-up.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not found"
"$PY" - "$TINY" <<'PY' || exit 1
import sys

try:
    import jax
except ImportError:
    sys.exit("jax is not installed for this python: pip install -U 'jax[cuda12]' (and pip install -e '.[bench]')")
print("jax", jax.__version__, jax.devices())
try:
    import torch

    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", cuda, torch.version.cuda,
          "cudnn", torch.backends.cudnn.version() if cuda else None)
except ImportError:
    print("torch not installed: the torch rows are skipped")
if jax.default_backend() != "gpu" and not sys.argv[1]:
    sys.exit(f"JAX sees no GPU (backend {jax.default_backend()!r}): install jax with CUDA, or run with --tiny "
             "to check this script on CPU (python -m benchmarks.run --quick is the CPU comparison)")
PY

# 2. Check: every variant against rj.scan's default, same parameters and inputs.
if [ "${CHECK:-1}" != "0" ]; then
  CHECK_DIR=bench-results/gpu-check
  mkdir -p bench-results
  "$PY" -m benchmarks.run --preset gpu --cells lstm gru elman mingru lru --lengths 64 --batch 4 \
    --systems rnnjax rnnjax-autodiff rnnjax-remat rnnjax-remat-sqrt rnnjax-kernel --vmap-length 64 \
    --repeats 1 --min-repeats 1 --max-minutes 0 --check --no-plot ${TINY:+--tiny --cells lstm --lengths 16 --vmap-length 16} \
    --out "$CHECK_DIR" > "$CHECK_DIR.log" 2>&1 || { tail -n 30 "$CHECK_DIR.log"; exit 1; }
  "$PY" - "$CHECK_DIR" "${CHECK_TOL:-1e-3}" <<'PY' || exit 1
import json
import sys

records = json.load(open(sys.argv[1] + "/results.json"))["records"]
tol = float(sys.argv[2])
failed = [r for r in records if r["status"] == "error"
          or r.get("max_abs_diff_vs_rnnjax", 0.0) > tol]
checked = [r for r in records if "max_abs_diff_vs_rnnjax" in r]
for r in failed:
    print(f"check FAILED: {r['system']} {r['cell']} {r['mode']} T={r['T']}: "
          f"{r.get('note') or 'max |diff| vs rnnjax %.3g > %g' % (r['max_abs_diff_vs_rnnjax'], tol)}")
worst = max((r["max_abs_diff_vs_rnnjax"] for r in checked), default=float("nan"))
print(f"check: {len(checked)} results of rnnjax variants against rnnjax, largest |difference| {worst:.3g} "
      f"(limit {tol:g}); {sum(r['status'] == 'skipped' for r in records)} skipped; log: {sys.argv[1]}.log")
sys.exit(1 if failed or not checked else 0)
PY
fi

# 3. The comparison.
"$PY" -m benchmarks.run --preset gpu "${TINY_ARGS[@]}" "$@"
status=$?

# 4. Matrix-state recurrences (LA=0 skips): rj.linear_attention's Sequential and Chunked against
#    causal attention and, where they import, fla's and xLSTM's Triton kernels (chunk_simple_gla,
#    chunk_gla, chunk_delta_rule, chunk_gated_delta_rule, chunk_rwkv7, mlstm_kernels' chunkwise
#    kernel). The machine may have no internet: WHEELS=DIR
#    installs fla-core and mlstm-kernels from wheels in DIR first
#    (pip download --no-deps fla-core==0.6.0 mlstm-kernels==2.0.6 einops -d DIR).
if [ "${LA:-1}" != "0" ]; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" fla-core mlstm-kernels einops \
      || echo "fla-core / mlstm-kernels not installed from $WHEELS: their rows are skipped"
  fi
  if [ -n "$TINY" ]; then
    "$PY" -m benchmarks.linear_attention --tiny --out bench-results/linear-attention-tiny || status=1
  else
    "$PY" -m benchmarks.linear_attention --preset gpu || status=1
  fi
fi
exit $status
