#!/usr/bin/env bash
# Creates .venv-lmms: lmms-eval 0.7.3 and the few packages its command line needs, layered on .venv.
#
#   bash scripts/lmms-env.sh        # then: .venv-lmms/bin/python -m lmms_eval --model vtc ...
#
# .venv-lmms sees .venv's packages after its own (a .pth file adds them), so torch, transformers and
# vtc (with its lmms_eval.models entry point) come from .venv; pip never touches .venv. Does nothing
# when .venv-lmms is up to date with scripts/lmms-requirements.txt. VTC_BASE_VENV names another base.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
base="${VTC_BASE_VENV:-.venv}"
env=.venv-lmms
stamp="$env/.vtc-lmms-setup"
want="$(cat scripts/lmms-requirements.txt constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
base_site="$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$env"
"$base/bin/python" -m venv "$env"  # .venv's interpreter: the same Python as the packages it layers on
env_site="$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# addsitedir (not a plain path line) so .venv's own .pth files, vtc's editable install among them, apply.
echo "import site; site.addsitedir('$base_site')" > "$env_site/_vtc_base.pth"
# The venv's own older setuptools would shadow .venv's.
"$env/bin/python" -m pip uninstall -q -y setuptools
# lmms-eval without its dependency list; then the few packages its command line needs, with theirs.
# The constraints keep torch and transformers at .venv's pins should anything ask for them.
grep '^lmms-eval' scripts/lmms-requirements.txt > "$env/lmms-eval.txt"
grep -v '^lmms-eval' scripts/lmms-requirements.txt > "$env/deps.txt"
pip=("$env/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
# pip's resolver warns about the dependencies lmms-eval declares and does not get: kept in a log.
log="$env/pip.log"
"${pip[@]}" --no-deps -r "$env/lmms-eval.txt" 2> "$log" || { cat "$log" >&2; exit 1; }
"${pip[@]}" -r "$env/deps.txt" 2>> "$log" || { cat "$log" >&2; exit 1; }
"$env/bin/python" -c 'import lmms_eval.api.model, lmms_eval.evaluator'
echo "$want" > "$stamp"
