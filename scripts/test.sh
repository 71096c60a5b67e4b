#!/usr/bin/env bash
# Runs the test suite in .venv. `scripts/test.sh` runs the default (fast) tests;
# `scripts/test.sh slow` runs only the tests marked slow. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "slow" ]; then shift; exec .venv/bin/python -m pytest -m slow "$@"; fi
exec .venv/bin/python -m pytest "$@"
