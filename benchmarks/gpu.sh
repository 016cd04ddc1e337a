#!/usr/bin/env bash
# Every GPU measurement the issues ask for, on the lent GPU machine, in under 8 minutes (step limits: 450 s).
#
#   OUT=/path/to/results bash benchmarks/gpu.sh
#
# Uses the machine's own Python stack (its torch, triton and transformers: vtc must run there as it is),
# installing only what is missing, and writes under $OUT: env.txt (versions and device), tests.txt (the
# gpu-marked kernel tests, compiled for real, and the transformers-surface and adapter tests on that
# stack), kernels.csv (bench_kernels rows), kv_quant.csv (bench_kv_quant rows: GB/s and share of peak
# bandwidth; it exits non-zero without a usable GPU or on a result that differs from the reference) and
# prefill.csv (bench_prefill rows). Each step has its own time limit, so one slow step cannot eat the
# others' time; the exit code is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder results go to}"
mkdir -p "$OUT"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rc=0
step() {  # step SECONDS LOGFILE COMMAND...: run with a limit, append its output, remember a failure
    local limit=$1 log=$2
    shift 2
    echo "== $* (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    local code=$?
    echo "== exit $code" | tee -a "$log"
    [ "$code" -eq 0 ] || [ "$rc" -ne 0 ] || rc=$code
}
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    $py -c 'import sys, torch, transformers; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("transformers", transformers.__version__)'
    $py -c 'import triton; print("triton", triton.__version__)' 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt"
$py -c 'import pytest' 2>/dev/null || $py -m pip install -q pytest >/dev/null 2>&1
step 180 "$OUT/tests.txt" $py -m pytest -q -p no:cacheprovider -m gpu tests/kernels
step 100 "$OUT/tests.txt" $py -m pytest -q -p no:cacheprovider -x tests/test_surface.py tests/adapters tests/engine
step 50 "$OUT/kernels.txt" $py benchmarks/bench_kernels.py --out "$OUT/kernels.csv"
step 60 "$OUT/kv_quant.txt" $py benchmarks/bench_kv_quant.py --out "$OUT/kv_quant.csv"
step 60 "$OUT/prefill.txt" $py benchmarks/bench_prefill.py --out "$OUT/prefill.csv"
exit "$rc"
