#!/usr/bin/env bash
# Parallel-in-time methods on one GPU, in 10-12 minutes, three parts (each logged, each with
# its own time limit, results in bench-results/gpu-parallel-<UTC time>.*, git-ignored):
#
# 1. benchmarks/lab/newton_training.py: iterations of exact Newton to float32 rounding for ParaGRU,
#    ParaLSTM, IndRNN (T=4096), and ParaGRU fwd+bwd by rj.Newton("deer", tol=None, max_iters=3,
#    init="step") vs rj.Sequential() at T = 1024, 4096, 16384, B=16, H=256   (.newton.{json,md})
# 2. benchmarks/lab/parallel_sweep.py --preset gpu: rj.scan's methods for minGRU and LRU over
#    T = 1024 .. 65536, DEER / quasi-DEER for a GRU with hidden 16, and sequential / Newton
#    (converging, and fixed 3 iterations from init="step") for paragru, paralstm, indrnn, plus
#    the exact clipped scan (associative, chunked) for indrnn (relu);
#    forward and forward+backward; the "auto" table those numbers imply   (.{json,md,png}, .auto_table.txt)
# 3. examples/adding_problem.py at T=4096: ParaGRU trained by Newton and by the sequential scan
#    from the same parameters on the same batches, loss curves side by side   (.adding.log)
# 4. benchmarks/lab/newton_solve.py: Newton's linear solve, associative vs sequential
#    (rj.Newton(solve=...); "auto" is associative on GPUs, unmeasured there so far)   (.solve.log)
#
#   bash benchmarks/lab/gpu_parallel.sh              # from anywhere, on the GPU machine
#   PYTHON=.venv/bin/python bash benchmarks/lab/gpu_parallel.sh --T 1024,4096   # extra sweep options
#   TINY=1 bash benchmarks/lab/gpu_parallel.sh       # any machine, CPU too: tiny sizes, seconds to
#                                                    # minutes, results in a temporary directory
#   SKIP_NEWTON=1 / SKIP_SWEEP=1 / SKIP_ADDING=1 / SKIP_SOLVE=1   # leave a part out
#   SWEEP_BUDGET=270  ADDING_ARGS="--steps 300 ..."  # the sweep's --budget-s; the example's options
#
# Needs a jax that sees a GPU (unless TINY=1). Targets from the issue (fwd+bwd, read off the
# Markdown tables): minGRU/LRU associative or chunked >= 10x sequential at T >= 4096; GRU hidden 16
# newton(quasi-deer) >= 5x sequential at T >= 16384; ParaGRU Newton (3 fixed iterations) >= 10x
# sequential at T >= 4096 (B=16, H=256); exact Newton at float32 rounding in <= 4 iterations.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"     # rnnjax from this checkout, installed or not
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}   # one GPU
export XLA_PYTHON_CLIENT_PREALLOCATE=false
TINY=${TINY:-}

if [ -n "$TINY" ]; then
  OUT=$(mktemp -d)/gpu_parallel_tiny
  NEWTON_ARGS=(--tiny)
  SWEEP_ARGS=(--T 64,128 --batch 2 --hidden 8 --repeats 1 --budget-s 300)
  ADDING=(--steps 3 --length 64 --hidden 8 --batch 4)
  SOLVE=(--sizes 16:8 --lengths 8 --batch 2 --hidden 4 --repeats 1)
  LIMIT_NEWTON=600 LIMIT_SWEEP=900 LIMIT_ADDING=300 LIMIT_SOLVE=300
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c 'import jax, sys; print("jax", jax.__version__, jax.devices()); sys.exit(0 if jax.default_backend() == "gpu" else "no GPU for jax")' || exit 1
  OUT=bench-results/gpu-parallel-$(date -u +%Y%m%dT%H%M%SZ)
  NEWTON_ARGS=()
  SWEEP_ARGS=(--budget-s "${SWEEP_BUDGET:-270}")
  read -r -a ADDING <<< "${ADDING_ARGS:---steps 300 --length 4096 --hidden 64 --batch 64}"
  SOLVE=(--lengths 4096,16384 --batch 16 --hidden 256)
  LIMIT_NEWTON=300 LIMIT_SWEEP=$(( ${SWEEP_BUDGET:-270} + 90 )) LIMIT_ADDING=300 LIMIT_SOLVE=150
fi
mkdir -p "$(dirname "$OUT")"
echo "results: $OUT.*"
status=0

if [ -z "${SKIP_NEWTON:-}" ]; then
  echo "== newton_training: iterations to float32 rounding; ParaGRU Newton vs sequential"
  timeout "$LIMIT_NEWTON" "$PY" -m benchmarks.lab.newton_training "${NEWTON_ARGS[@]}" --out "$OUT.newton" \
    > "$OUT.newton.log" 2>&1 || status=$?
  tail -n 40 "$OUT.newton.log"
fi

if [ -z "${SKIP_SWEEP:-}" ]; then
  echo "== parallel_sweep --preset gpu"
  # The preset stops measuring after --budget-s and writes what it has (also after every T, so
  # the backstop timeout loses at most one T).
  timeout -s INT "$LIMIT_SWEEP" "$PY" -m benchmarks.lab.parallel_sweep --preset gpu "${SWEEP_ARGS[@]}" --out "$OUT" "$@" \
    > "$OUT.sweep.log" 2>&1 || status=$?
  tail -n 5 "$OUT.sweep.log"
  [ -f "$OUT.json" ] && "$PY" -m benchmarks.lab.parallel_sweep --auto-table "$OUT.json" | tee "$OUT.auto_table.txt"
  [ -f "$OUT.md" ] && grep -E "^\| (mingru|lru|gru:16|paragru|paralstm|indrnn) \| fwd\+bwd" "$OUT.md"
fi

if [ -z "${SKIP_ADDING:-}" ]; then
  echo "== examples/adding_problem.py ${ADDING[*]}"
  timeout "$LIMIT_ADDING" "$PY" examples/adding_problem.py "${ADDING[@]}" > "$OUT.adding.log" 2>&1 || status=$?
  tail -n 30 "$OUT.adding.log"
fi
if [ -z "${SKIP_SOLVE:-}" ]; then
  echo "== newton_solve: associative vs sequential linear solves ${SOLVE[*]}"
  timeout "$LIMIT_SOLVE" "$PY" -m benchmarks.lab.newton_solve "${SOLVE[@]}" > "$OUT.solve.log" 2>&1 || status=$?
  tail -n 12 "$OUT.solve.log"
fi
echo "exit status $status; results: $OUT.*"
exit $status
