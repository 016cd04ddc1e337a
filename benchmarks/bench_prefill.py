"""Prefill time of a LLaVA-1.5-shaped model: dense, a slicing oracle, and vtc, for every pruning method.

Each method runs once through vtc first; the oracle then replays that run's measured schedule (the same
tokens gathered at the same layers, GemFilter's pre-pass and renumbering, MustDrop's cache trim) with no
scoring at all, so vtc's speedup divided by the oracle's is vtc's own overhead. Both are printed beside
the FLOPs-ideal speedup. Rows go to benchmarks/results/prefill.csv with the date, device, versions and the
command that reproduces them.

    python benchmarks/bench_prefill.py                 # every pruning method at r192, r128, r64; hidden 512
    python benchmarks/bench_prefill.py --methods dart.r128,gemfilter.r128 --repeats 15
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
