#!/usr/bin/env bash
# The lent GPU machines' stack, tested on CPU: python 3.12, torch 2.11.0, triton 3.6.0, torchvision 0.26.0, set up by
# scripts/env.sh in .venv-gpu-stack (once; a second run installs nothing). numpy is pinned to 2.3.5 because triton 3.6's
# interpreter breaks with numpy >= 2.4; the interpreter lane itself does not run here (the main stack runs it).
# `wheel` is installed on purpose: `pip install --no-build-isolation -e .` once failed with it (legacy develop path).
# Then the reference, ext-cpu and gpu-compile lanes run with that python. Extra arguments go to run_lanes.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_python312() {
  for p in ${PYTHON312:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -n "$p" ] && "$p" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && { echo "$p"; return 0; }
  done
  return 1
}

export MMKERNELS_VENV="${MMKERNELS_STACK_VENV:-$ROOT/.venv-gpu-stack}"
if [ ! -x "$MMKERNELS_VENV/bin/python" ]; then
  PYTHON="$(find_python312)" || { echo "[gpu-stack] python 3.12 not found (set PYTHON312)"; exit 1; }
  export PYTHON
fi
export MMKERNELS_DEPS="torch==2.11.0 triton==3.6.0 torchvision==0.26.0 numpy==2.3.5 pybind11 ninja pytest pytest-benchmark matplotlib hypothesis==6.170.15 tqdm wheel setuptools"
export MMKERNELS_BUILD_CUDA=0 MMKERNELS_PTXAS_VERBOSE=0  # the CUDA compile check runs on the main stack
source "$ROOT/scripts/env.sh"
"$PY" -c "import sys, torch, triton, numpy; print(f'[gpu-stack] python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
cd "$ROOT"
set +e
"$PY" tests/run_lanes.py --lanes reference,ext-cpu,gpu-compile "$@" | tee "$MMKERNELS_VENV/lanes.log"
rc=${PIPESTATUS[0]}
echo "python 3.12 / torch 2.11 / triton 3.6: $(grep -E '^lane ' "$MMKERNELS_VENV/lanes.log" | awk '{print $2 " " $3}' | paste -sd, -)"
exit "$rc"
