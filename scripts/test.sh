#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (GPU and slow tests are skipped by default).
# A run that collects no test fails: pytest's exit code 5 becomes 1.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "no test was collected: failing the run" >&2
    exit 1
fi
exit "$rc"
