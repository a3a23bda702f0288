#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs every test lane (tests/run_lanes.py)
# and prints one summary line per lane. Extra arguments go to each lane's pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" tests/run_lanes.py "$@"
