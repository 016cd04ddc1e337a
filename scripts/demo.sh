#!/usr/bin/env bash
# Sets up .venv if needed, then runs vtc's main job on the embedded default (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vtc demo "$@"
