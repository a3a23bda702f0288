#!/usr/bin/env bash
# Everything a lent GPU machine should run, in ONE call of at most 10 minutes on a machine with no network:
#   MMKERNELS_GIT_COMMIT=<sha> bash benchmarks/gpu_suite.sh [--dry-run] OUT_DIR
# Stages, headline numbers first, each under its own limit; all limits together stay under SUITE_BUDGET_S
# (default 480 s, install and build included: earlier H200 runs took 266-342 s, so one call fits in 10 minutes and
# a rerun of what failed fits in the rest of a 15-minute lease), and a stage that would start with under 15 s left is
# skipped (SUITE_SKIP=a,b skips stages by name; a rerun on the still-warm machine can skip install):
#   install        pip install --no-build-isolation --no-deps -e . (fallback: build_ext --inplace); build time reported
#   env            versions, device, commit, mmkernels.env_report()
#   tests_new      the cuda tests of the kernels and paths that never ran on a GPU (NEW_TESTS below), each file in
#                  its own process (benchmarks/run_each.sh): one illegal memory access loses one file
#   bench_coef     coefficient op: fused vs eager reference (docs/architecture.md shapes)
#   bench_train    training step, joint vs every method, mmkernels vs authors' style, M = 2 and M = 3
#   tests_cuda     the rest of the cuda test lane (Triton + extension + CUDA-only tests on the GPU)
#   bench_compiled coefficient op: torch.compile(reference) and the authors' Python loop
#   bench_new      MMPareto's combine, valuation, Shapley, parameter-mode GE
#   bench_rest     the benchmarks unchanged since the last GPU run (taps, covariance noise)
# Every test and benchmark appends one JSON line to OUT_DIR/results.jsonl as it ends (benchmarks/_jsonl.py), so a
# timeout keeps what was measured. OUT_DIR ends with at most 8 files (all that comes back from a lent machine):
#   summary.txt versions.txt results.jsonl benchmarks.md benchmarks.png logs.tar.gz
# --dry-run: the same stages on CPU with tiny shapes and no install (the package must be installed); CI runs it.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-$ROOT/benchmarks/results/$(date +%Y%m%d-%H%M%S)}}"
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET_S:-480}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOGS="$(mktemp -d)"
SUMMARY="$OUT/summary.txt"
export MMKERNELS_JSONL="$OUT/results.jsonl"
: > "$SUMMARY"
: > "$MMKERNELS_JSONL"
cd "$ROOT"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # the _jsonl plugin

pack() {  # logs and extras into one archive; render the tables from what was measured
  if grep -q '"kind": "benchmark"' "$MMKERNELS_JSONL" 2>/dev/null; then
    "$PY" benchmarks/render.py "$MMKERNELS_JSONL" --md "$OUT/benchmarks.md" --png "$OUT/benchmarks.png" \
      >> "$LOGS/render.log" 2>&1 && echo "render: ok" >> "$SUMMARY"
  fi
  echo "total: $(( $(date +%s) - T0 ))s" >> "$SUMMARY"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  rm -rf "$LOGS"
}
trap pack EXIT
trap 'exit 143' TERM INT

stage() {  # stage NAME SECONDS command...  (runs with MMKERNELS_STAGE=NAME; skipped when the budget is spent)
  local name="$1" limit="$2"; shift 2
  if [[ ",${SUITE_SKIP:-}," == *",$name,"* ]]; then
    echo "$name: skipped (SUITE_SKIP)" | tee -a "$SUMMARY"
    return 0
  fi
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 15 ]; then
    echo "$name: skipped (budget spent)" | tee -a "$SUMMARY"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t=$(date +%s)
  echo "===== $name (limit ${limit}s)"
  MMKERNELS_STAGE="$name" timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$LOGS/$name.log"
  echo "$name: rc=$rc ($(( $(date +%s) - t ))s)$([ $rc -eq 124 ] && echo ' TIMED OUT')" | tee -a "$SUMMARY"
  return $rc
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p _jsonl)
# kernels and paths committed since the last GPU run (PMR, MMPareto, valuation, update mode, the coefficient kernel,
# the extension's new C++ files), first, one process per file
NEW_TESTS=(tests/test_coefficients_triton.py tests/test_pmr_triton.py tests/test_mmpareto_triton.py
  tests/test_mmpareto_numerics.py tests/test_valuation_triton.py tests/test_update_api.py tests/test_pmr_api.py
  tests/test_valuation_api.py tests/test_valuation_properties.py
  tests/test_coefficients_ext.py tests/test_shapley_ext.py tests/test_sync_free_cuda.py)
if [ "$DRY" = 1 ]; then
  export MMKERNELS_BENCH_DEVICE=cpu
  BENCH=("${PYTEST[@]}" --benchmark-min-rounds=1)
  TRAIN_K=(-k "joint-M2 or ogm_ge-M2")
  TESTS=(tests/test_edges_triton.py -m triton)
  NEW_TESTS=(tests/test_mmpareto_numerics.py tests/test_pmr_triton.py)
  NEW_MARK=(-m triton -k "opposite or nonfinite or refresh")
  export TRITON_INTERPRET=1
else
  export MMKERNELS_BENCH_FULL=1 MMKERNELS_TEST_DEVICE=cuda
  BENCH=("${PYTEST[@]}" --bench-full)
  TRAIN_K=()
  TESTS=(tests -m "triton or ext or cuda")
  NEW_MARK=(-m "triton or ext or cuda")
  for f in "${NEW_TESTS[@]}"; do TESTS+=(--ignore="$f"); done
  # pytest-xdist (on the GPU machines): a test that crashes the interpreter loses one worker, not the lane
  "$PY" -c "import xdist" 2>/dev/null && TESTS+=(-n 4)
fi

# --- install and build for the local GPU (16 cores there)
if [ "$DRY" = 0 ]; then
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${CAP:-9.0}}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  if ! stage install 170 "$PY" -m pip install --no-build-isolation --no-deps -e .; then
    # fallback without pip: the extension built in place, python_api/ seen as mmkernels.api through a link
    stage install_inplace 150 "$PY" setup.py build_ext --inplace
    [ -e mmkernels/api ] || ln -s ../python_api mmkernels/api
    export PYTHONPATH="$ROOT:$PYTHONPATH"
  fi
fi

# --- versions, device, commit
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${MMKERNELS_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "mode: $([ "$DRY" = 1 ] && echo dry-run || echo full)"
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=${MAX_JOBS:-}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | head -n 3
  nvcc --version 2>&1 | tail -n 2
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|torchvision|numpy|pytest|pytest-benchmark|pybind11|ninja|setuptools|pip|wheel) "
} > "$OUT/versions.txt" 2>&1
stage env 30 "$PY" -c "import mmkernels; mmkernels.env_report()"
cat "$LOGS/env.log" >> "$OUT/versions.txt"

# --- never-run kernels first (each file alone), headline numbers, the rest of the test lane, then the rest
stage tests_new 120 env PYTHON="$PY" bash benchmarks/run_each.sh 60 -- -p _jsonl "${NEW_MARK[@]}" -- "${NEW_TESTS[@]}"
stage bench_coef 45 "${BENCH[@]}" benchmarks/bench_coefficients.py -k "fused or eager"
stage bench_train 120 "${BENCH[@]}" benchmarks/bench_train_step.py "${TRAIN_K[@]}"
stage tests_cuda 100 "${PYTEST[@]}" "${TESTS[@]}"
stage bench_compiled 60 "${BENCH[@]}" benchmarks/bench_coefficients.py -k "compiled or authors"
stage bench_new 60 "${BENCH[@]}" benchmarks/bench_mmpareto.py benchmarks/bench_valuation.py benchmarks/bench_shapley.py \
  benchmarks/bench_ge_isotropic.py
stage bench_rest 60 "${BENCH[@]}" benchmarks/bench_taps.py benchmarks/bench_noise.py

cat "$SUMMARY"
grep -q -E "rc=[1-9]|skipped \(budget" "$SUMMARY" && exit 1
exit 0
