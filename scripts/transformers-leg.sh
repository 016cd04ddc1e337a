#!/usr/bin/env bash
# Runs tests against another transformers release, reusing .venv's pinned torch and everything else.
#
#   bash scripts/transformers-leg.sh VERSION|newest [pytest args...]
#
# A small venv under .venv-tf/VERSION sees .venv's packages after its own (a .pth file adds them) and
# gets only transformers, plus whatever that release needs in other versions, installed into itself;
# pip never touches .venv. "newest" takes the newest release on the index; if that is the version .venv
# already has, the leg is not run again (the main run covered it) and the script says so.
set -uo pipefail
cd "$(dirname "$0")/.."
want="${1:?usage: transformers-leg.sh VERSION|newest [pytest args...]}"
shift
base_site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
pinned="$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
leg=".venv-tf/$want"
if [ ! -x "$leg/bin/python" ]; then
    python3 -m venv "$leg" || exit 1
    leg_site="$("$leg/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir (not a plain path line) so .venv's own .pth files, vtc's editable install among them, apply.
    echo "import site; site.addsitedir('$base_site')" > "$leg_site/_vtc_base.pth"
fi
grep -i '^torch' constraints.txt > "$leg/constraints.txt"
if [ "$want" = newest ]; then
    spec=(--upgrade transformers)
else
    spec=("transformers==$want")
fi
"$leg/bin/python" -m pip install -q --disable-pip-version-check -c "$leg/constraints.txt" "${spec[@]}" || exit 1
got="$("$leg/bin/python" -c 'import transformers; print(transformers.__version__)')" || exit 1
if [ "$want" = newest ] && [ "$got" = "$pinned" ]; then
    echo "== transformers leg: the newest release is $got, the pinned version; the main run covered it"
    exit 0
fi
echo "== transformers leg: transformers $got (asked: $want), torch $("$leg/bin/python" -c 'import torch; print(torch.__version__)')"
"$leg/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "no test was collected in the transformers $got leg: failing the run" >&2
    exit 1
fi
exit "$rc"
