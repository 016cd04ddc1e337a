#!/usr/bin/env bash
# lmms-eval's command line vs `vtc eval` on the same ShapesQA rows, dense and pruned: builds .venv-lmms
# (scripts/lmms-env.sh) if needed, then runs scripts/lmms_check.py, which fails on any difference in
# predictions or scores. Arguments go to lmms_check.py; --work defaults to a fresh temporary folder.
#
#   bash scripts/lmms-check.sh [--rows 12] [--methods dense,dart.r64] [--work DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
base="${VTC_BASE_VENV:-.venv}"
bash scripts/lmms-env.sh
args=("$@")
if [[ " $* " != *" --work "* ]]; then
    args+=(--work "$(mktemp -d -t vtc-lmms-check.XXXXXX)")
fi
exec "$base/bin/python" scripts/lmms_check.py "${args[@]}"
