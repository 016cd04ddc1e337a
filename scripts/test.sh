#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite (GPU and slow tests are skipped by default) on the
# pinned set, and the adapter, compaction, surface and method-matrix (padding and restore) tests on the floor and on
# the newest transformers release (scripts/transformers-leg.sh). Arguments go to the main pytest run;
# VTC_TEST_LEGS=0 skips the two transformers legs. A run that collects no test fails: pytest's exit code 5
# becomes 1.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
echo "== main run: transformers $(.venv/bin/python -c 'import transformers; print(transformers.__version__)') (pinned)"
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "no test was collected: failing the run" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
[ "${VTC_TEST_LEGS:-1}" = 0 ] && exit 0
floor="$(.venv/bin/python -c 'from vtc.surface import TESTED_FLOOR; print(TESTED_FLOOR)')" || exit 1
# On the legs, the matrix's padding and restore rows (every method on every family); the pinned run has all of it.
legs=(tests/adapters tests/test_matrix.py tests/test_surface.py -k "not test_matrix or padded or remove" -q -p no:cacheprovider)
bash scripts/transformers-leg.sh "$floor" "${legs[@]}" || exit 1
bash scripts/transformers-leg.sh newest "${legs[@]}" || exit 1
