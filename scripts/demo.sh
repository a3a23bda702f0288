#!/usr/bin/env bash
# The README's demo command: sets up .venv if needed, then runs `python -m mmkernels demo` (arguments pass through).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" -m mmkernels demo "$@"
