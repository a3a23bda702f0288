#!/usr/bin/env bash
# The README's test command: sets up .venv if needed, then runs the test lanes (tests/run_lanes.py) and prints one
# summary line per lane. Quick by default (a few minutes on 2 CPU cores: the tests marked `full` and the benchmarks
# and gpu-compile lanes are left out); `--full` (or MMKERNELS_TEST_FULL=1, as CI sets) runs everything.
# Other arguments go to each lane's pytest (e.g. --lanes reference,triton -x).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" tests/run_lanes.py "$@"
