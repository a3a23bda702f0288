#!/usr/bin/env bash
# The lint lane: ruff's rules (pyflakes, pycodestyle, line length 120; pyproject.toml) and its format check over the
# whole repository. Fix with: .venv/bin/python -m ruff format . && .venv/bin/python -m ruff check --fix .
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"$PY" -m ruff check --output-format concise . || { echo "lint: ruff check failed"; exit 1; }
"$PY" -m ruff format --check . || { echo "lint: ruff format --check failed (run ruff format .)"; exit 1; }
echo "lint: ruff check and ruff format --check passed"
