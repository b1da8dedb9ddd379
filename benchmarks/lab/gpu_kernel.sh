#!/usr/bin/env bash
# The kernel engine (rj.Kernel()) on one lent GPU, one call, under 8 minutes:
#   1. the compiled kernels checked against rj.Sequential() (lengths, resets, reverse, Mixed
#      bfloat16, TF32) and a sweep of block_batch / num_warps at T=1024 (benchmarks/lab/kernel_gpu.py);
#   2. the table: LSTM, GRU, Elman at T=1024 and 4096, fwd and fwd+bwd, float32 with full
#      float32 products everywhere (PyTorch's TF32 off), rnnjax-kernel vs rnnjax's scan vs
#      PyTorch cuDNN vs jax.experimental.rnn (LSTM) vs Flax, and both rnnjax engines under
#      rj.Mixed(bfloat16);
#   3. (unless SKIP_CMDBUF is set) XLA's command buffers (CUDA graphs, WHILE included) around rnnjax's scan, in a process
#      of its own (the flag must be set before JAX starts).
# Everything is written under bench-results/gpu-kernel*/ (git-ignored) and packed into
# $OUT/results.tar.gz (bench-results/gpu_kernel.tar.gz when OUT is unset).
#
#   bash benchmarks/lab/gpu_kernel.sh            # on the GPU machine
#   bash benchmarks/lab/gpu_kernel.sh --tiny     # anywhere (kernels interpreted on CPU): numbers meaningless
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
DEST=${OUT:-bench-results}
mkdir -p "$DEST"
start=$(date +%s)
# Overrides for a short lease: TABLE_SYSTEMS (the table's systems), CHECK_ARGS (e.g. --skip-sweep),
# SKIP_CMDBUF=1 (no command-buffer process), TABLE_MIN / CHECK_LIMIT (minutes / seconds).
TABLE_SYSTEMS=${TABLE_SYSTEMS:-rnnjax-kernel rnnjax torch rnnjax-kernel-bf16 rnnjax-bf16 jax-cudnn flax}
CHECK_ARGS=${CHECK_ARGS:-}
TINY=""; SUFFIX=""; CHECK_LIMIT=${CHECK_LIMIT:-115}; TABLE_MIN=${TABLE_MIN:-3.4}
if [ "${1:-}" = "--tiny" ]; then TINY="--tiny"; SUFFIX="-tiny"; CHECK_LIMIT=400; TABLE_MIN=0; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null || true

timeout -s INT "$CHECK_LIMIT" "$PY" -m benchmarks.lab.kernel_gpu $TINY $CHECK_ARGS 2>&1 | tee "$DEST/kernel_check.log"
echo "checks and sweep done after $(( $(date +%s) - start )) s"

timeout -s INT "$(python3 -c "print(int(${TABLE_MIN} * 60 + 25))")" "$PY" -m benchmarks.run --preset gpu $TINY --cells lstm gru elman --lengths 1024 4096 \
  --systems $TABLE_SYSTEMS \
  --max-minutes "$TABLE_MIN" --no-plot --out "bench-results/gpu-kernel$SUFFIX" 2>&1 | tee "$DEST/kernel_table.log"
echo "table done after $(( $(date +%s) - start )) s"

if [ -z "${SKIP_CMDBUF:-}" ]; then
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1" \
  timeout -s INT 60 "$PY" -m benchmarks.run --preset gpu $TINY --cells lstm gru elman --lengths 1024 \
  --systems rnnjax --max-minutes 0.8 --no-plot --out "bench-results/gpu-kernel-cmdbuf$SUFFIX" 2>&1 \
  | tee "$DEST/kernel_cmdbuf.log"
fi
echo "all done after $(( $(date +%s) - start )) s"

ARCHIVE=${OUT:+$OUT/results.tar.gz}
tar czf "${ARCHIVE:-bench-results/gpu_kernel.tar.gz}" $(ls -d "bench-results/gpu-kernel$SUFFIX" \
  "bench-results/gpu-kernel-cmdbuf$SUFFIX" 2>/dev/null)
