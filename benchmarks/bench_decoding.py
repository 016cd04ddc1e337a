"""Generate time of a tiny LLaVA: dense vs each decoding method, side by side in one run.

Every spec decodes the same prompt greedily for a fixed number of new tokens through stock
``model.generate``; the table gives the median wall time per generated token, its ratio to dense, and
the extra forwards per generated token that the method ran (``TokenStats.extra_forwards``). Rows are
appended to benchmarks/results/decoding.csv with the date, device and versions.

    python benchmarks/bench_decoding.py                          # 8 layers, 24 new tokens, batch 1
    python benchmarks/bench_decoding.py --batch 2 --new 16 --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import vtc
from vtc.adapters import ADAPTERS

SPECS = ["dense", "deco", "var.demo", "dropout_decoding", "dropout_decoding.noop", "dart.r64+deco"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new", type=int, default=24, help="new tokens per generate")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--specs", nargs="*", default=SPECS, help="'+' joins a composition, 'dense' is no method")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decoding.csv"))
    args = parser.parse_args()

    torch.manual_seed(0)
    adapter_cls = ADAPTERS.get("llava")
    model = adapter_cls.tiny_model(num_layers=args.layers)
    inputs = adapter_cls.collate(model, adapter_cls.make_samples(model, batch=args.batch))
    times: dict[str, list[float]] = {spec: [] for spec in args.specs}
    extra: dict[str, int] = {}
    # Round-robin over the specs, so load from other processes drifts over all of them alike.
    for repeat in range(args.repeats + 1):  # the first round is a warm-up
        for spec in args.specs:
            methods = None if spec == "dense" else spec.split("+")
            handle = vtc.wrap(model, methods) if methods else None
            try:
                with torch.no_grad():
                    start = time.perf_counter()
                    model.generate(**inputs, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                    elapsed = time.perf_counter() - start
                extra[spec] = handle.stats.extra_forwards if handle else 0
            finally:
                if handle:
                    handle.remove()
            if repeat:
                times[spec].append(elapsed)
    median_ms = {s: 1000 * statistics.median(t) / args.new for s, t in times.items()}
    rows = [{"spec": s, "ms_per_token": median_ms[s], "extra": extra[s]} for s in args.specs]
    dense = next((r["ms_per_token"] for r in rows if r["spec"] == "dense"), None)
    print(f"tiny llava, {args.layers} layers, batch {args.batch}, {args.new} new tokens, median of {args.repeats}")
    print(f"{'spec':<24}{'ms/token':>10}{'x dense':>10}{'extra fwd/token':>17}")
    for r in rows:
        r["x_dense"] = r["ms_per_token"] / dense if dense else float("nan")
        r["extra_per_token"] = r["extra"] / args.new
        print(f"{r['spec']:<24}{r['ms_per_token']:>10.2f}{r['x_dense']:>10.2f}{r['extra_per_token']:>17.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["date", "device", "threads", "torch", "transformers", "layers", "batch", "new_tokens", "repeats", "spec"]
    fields += ["ms_per_token", "x_dense", "extra_forwards_per_token"]
    new_file = not out.exists()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new_file:
            writer.writeheader()
        for r in rows:
            writer.writerow({
                "date": datetime.date.today().isoformat(), "device": f"cpu ({platform.machine()})",
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "layers": args.layers, "batch": args.batch,
                "new_tokens": args.new, "repeats": args.repeats, "spec": r["spec"],
                "ms_per_token": round(r["ms_per_token"], 3), "x_dense": round(r["x_dense"], 3),
                "extra_forwards_per_token": round(r["extra_per_token"], 3),
            })  # fmt: skip
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
