"""Prefill time of a LLaVA-1.5-shaped model: dense, a slicing oracle, and vtc's DART, side by side.

The oracle slices the same number of visual tokens at the same layer with no scoring, so vtc's speedup
divided by the oracle's is vtc's own overhead; both are printed beside the FLOPs-ideal speedup. Rows go
to benchmarks/results/prefill.csv with the date, device and versions.

    python benchmarks/bench_prefill.py                 # hidden 512, 32 layers, fp32, on the GPU if any
    python benchmarks/bench_prefill.py --hidden 4096 --dtype bfloat16   # LLaVA-1.5-7B width on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

from vtc.cli import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "prefill.csv"
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", str(out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out)]
    raise SystemExit(main(["bench", "prefill", *args]))
