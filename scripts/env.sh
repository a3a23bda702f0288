#!/usr/bin/env bash
# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv if absent, installs what mmkernels needs,
# and (re)builds the package only when setup.py or csrc/ changed. A second run installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMKERNELS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[mmkernels] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

DEPS="torch==2.14.1 torchvision==0.29.1 numpy pybind11 ninja pytest pytest-benchmark matplotlib"
deps_stamp="$VENV/.mmkernels-deps"
if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$DEPS" ]; then
  echo "[mmkernels] installing $DEPS"
  "$PY" -m pip install -q $DEPS
  echo "$DEPS" > "$deps_stamp"
fi

build_key="$( (cat "$ROOT/setup.py"; find "$ROOT/csrc" -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) -print0 2>/dev/null | sort -z | xargs -0 cat 2>/dev/null; echo "cuda=${MMKERNELS_BUILD_CUDA:-auto} skip=${MMKERNELS_SKIP_EXT:-0}") | sha256sum | cut -d' ' -f1)"
build_stamp="$VENV/.mmkernels-build"
if [ ! -f "$build_stamp" ] || [ "$(cat "$build_stamp")" != "$build_key" ]; then
  echo "[mmkernels] building and installing mmkernels (pip install --no-build-isolation -e .)"
  (cd "$ROOT" && "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
  echo "$build_key" > "$build_stamp"
fi
export PATH="$VENV/bin:$PATH"
