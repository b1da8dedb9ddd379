#!/usr/bin/env bash
# One lent GPU, one call, under 8 minutes: the sequence-length comparison against PyTorch/cuDNN
# (benchmarks/gpu.sh without its check, trimmed to LSTM/GRU/Elman and T = 2^6, 2^8, ..., 2^14) and then the
# parallel-in-time sweep (benchmarks/lab/gpu_parallel.sh, trimmed budget). Both write under
# bench-results/ (git-ignored); everything they wrote is packed into $OUT/results.tar.gz (or
# bench-results/results.tar.gz when OUT is unset) so it survives the machine.
#
#   bash benchmarks/lab/gpu_session.sh            # on the GPU machine
#   bash benchmarks/lab/gpu_session.sh --tiny     # anywhere: seconds, numbers meaningless
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DEST=${OUT:-bench-results}
mkdir -p "$DEST"
start=$(date +%s)

if [ "${1:-}" = "--tiny" ]; then
  CHECK=0 bash benchmarks/gpu.sh --tiny --cells lstm,gru,elman --systems rnnjax flax torch attention \
    --out bench-results/tiny-session 2>&1 | tee "$DEST/gpu_suite.log"
  "$PY" -m benchmarks.lab.parallel_sweep --cells mingru,gru:4 --methods sequential,associative,newton \
    --T 32,64 --batch 2 --hidden 4 --repeats 1 --out bench-results/tiny-session/parallel \
    2>&1 | tee "$DEST/gpu_parallel.log"
  tar czf "$DEST/results.tar.gz" bench-results/tiny-session
  exit 0
fi

# 1. rnnjax vs Flax vs PyTorch (cuDNN) vs causal attention; stops measuring after 3.4 minutes.
CHECK=0 bash benchmarks/gpu.sh --cells lstm,gru,elman --systems rnnjax rnnjax-remat-sqrt flax torch attention \
  --lengths 64 256 1024 4096 16384 --max-minutes 3.4 2>&1 | tee "$DEST/gpu_suite.log"
echo "suite done after $(( $(date +%s) - start )) s"

# 2. sequential / associative / chunked / auto / (quasi-)DEER, stops measuring after 160 s.
bash benchmarks/lab/gpu_parallel.sh --budget-s 160 2>&1 | tee "$DEST/gpu_parallel.log"
echo "all done after $(( $(date +%s) - start )) s"

find bench-results -newer benchmarks/lab/gpu_session.sh -type f \
  ! -name '*.tar.gz' -print0 | tar czf "$DEST/results.tar.gz" --null -T -
tar tzf "$DEST/results.tar.gz"
