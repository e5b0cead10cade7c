#!/usr/bin/env bash
# The test command: sets up .venv (serving + training + dev dependencies) if needed, then runs
# lint, type checks and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/python-env.sh
source scripts/python-env.sh
ensure_venv test
echo "[test] installing the project with the cpu, train and dev extras (first run: a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[cpu,train,dev]"

echo "[test] ruff"
.venv/bin/ruff check app training tests scripts
.venv/bin/ruff format --check app training tests scripts
echo "[test] mypy --strict app scripts/ci; mypy training scripts/dev"
.venv/bin/mypy --strict app
.venv/bin/mypy --strict scripts/ci
.venv/bin/mypy training
.venv/bin/mypy scripts/dev
echo "[test] pytest"
exec .venv/bin/python -m pytest "$@"
