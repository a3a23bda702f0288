#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call that fits in 10 minutes:
#   bash benchmarks/gpu_suite.sh OUT_DIR
# 1. install the package (no network there: --no-build-isolation --no-deps) and build mmkernels._C for the local GPU
# 2. versions, device name, backend report
# 3. the cuda test lane (Triton + extension + CUDA-only tests on the GPU)
# 4. every benchmark in benchmarks/ at full size, as pytest-benchmark JSON, rendered to markdown + PNG
# Every stage runs under its own time limit and the suite goes on after a failed stage; OUT_DIR/summary.txt says
# which passed. Commit OUT_DIR under benchmarks/results/.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-$ROOT/benchmarks/results/$(date +%Y%m%d-%H%M%S)}}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

stage() {  # stage NAME SECONDS command...
  local name="$1" limit="$2"; shift 2
  local t=$(date +%s)
  echo "===== $name (limit ${limit}s)" | tee -a "$OUT/suite.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log" | tee -a "$OUT/suite.log"
  echo "$name: rc=$rc ($(( $(date +%s) - t ))s)" | tee -a "$SUMMARY"
  return $rc
}

# --- 1. install + build for the local GPU
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${CAP:-9.0}}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
stage install 300 "$PY" -m pip install --no-build-isolation --no-deps -e .

# --- 2. versions and device
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
  nvcc --version 2>&1 | tail -n 2
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|torchvision|numpy|pytest|pytest-benchmark|pybind11|ninja) "
} > "$OUT/versions.txt" 2>&1
stage env 60 "$PY" -c "import mmkernels; mmkernels.env_report()"
"$PY" - "$OUT/device.json" <<'PYEOF' 2>>"$OUT/suite.log"
import json, sys, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": []}
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)})
json.dump(info, open(sys.argv[1], "w"), indent=1)
PYEOF

# --- 3. cuda test lane
MMKERNELS_TEST_DEVICE=cuda stage tests_cuda 180 "$PY" -m pytest tests -m "triton or ext or cuda" -q -p no:cacheprovider \
  --junitxml="$OUT/tests_cuda.xml"

# --- 4. benchmarks, full size
LEFT=$(( 570 - ($(date +%s) - T0) ))
[ "$LEFT" -lt 60 ] && LEFT=60
MMKERNELS_BENCH_FULL=1 stage benchmarks "$LEFT" "$PY" -m pytest benchmarks -q -p no:cacheprovider --bench-full \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,mean,stddev,rounds
if [ -s "$OUT/benchmarks.json" ]; then
  "$PY" benchmarks/render.py "$OUT/benchmarks.json" --md "$OUT/benchmarks.md" --png "$OUT/benchmarks.png" \
    >> "$OUT/suite.log" 2>&1 && echo "render: ok" >> "$SUMMARY"
fi
echo "total: $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
grep -q "rc=[^0]" "$SUMMARY" && exit 1
exit 0
