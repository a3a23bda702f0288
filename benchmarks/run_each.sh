#!/usr/bin/env bash
# Each test file in its own pytest process, so a crash (an illegal memory access, a segfault) loses one file, not
# the whole stage:  run_each.sh SECONDS_PER_FILE -- PYTEST_ARGS... -- FILE...
# Missing files are reported and skipped. Prints "FILE: rc=N (Ts)" per file; exits 1 if any file failed.
set -u
limit="$1"; shift
[ "${1:-}" = "--" ] && shift
args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
PY="${PYTHON:-python3}"
failed=0
for f in "$@"; do
  if [ ! -e "$f" ]; then echo "$f: missing"; continue; fi
  t=$(date +%s)
  timeout --kill-after=5 "$limit" "$PY" -m pytest -q -p no:cacheprovider "${args[@]}" "$f" 2>&1 | tail -n 3
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 5 ] && rc=0           # no test selected in this file for this lane
  echo "$f: rc=$rc ($(( $(date +%s) - t ))s)$([ "$rc" -eq 124 ] && echo ' TIMED OUT')"
  [ "$rc" -ne 0 ] && failed=1
done
exit $failed
