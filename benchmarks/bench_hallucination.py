"""Hallucination metrics of ShapesQA on the reference model: dense vs the decoding methods and pruning.

    python benchmarks/bench_hallucination.py [--rows 300] [--methods dense,var,deco,...]

Runs ``vtc eval --task shapesqa`` on a held-out split (batched, greedy) and prints, per method, the QA
accuracy, POPE-style metrics of the ``exist`` questions, the CHAIR-style rates of the descriptions, and the
decode time per generated token and extra forwards. Rows are appended to
``benchmarks/results/hallucination.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from vtc.bench import format_rows
from vtc.cli import main as vtc_main
from vtc.eval import shapesqa
from vtc.reference.model import WEIGHTS

DEFAULT = "dense,var,deco,dropout_decoding,dart.r64,dart.r64+deco"
RESULTS = Path(__file__).parent / "results" / "hallucination.csv"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default=str(WEIGHTS))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        shapesqa.write_split(data, "test", args.rows)
        command = ["eval", "--model", args.model, "--tasks", "shapesqa", "--data", f"shapesqa={data}"]
        command += ["--method", args.methods, "--batch-size", str(args.batch_size), "--out", str(runs)]
        vtc_main([*command, "--no-progress"])
        rows = []
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            run = json.loads((runs / "shapesqa" / method.replace("+", "__") / "run.json").read_text())
            m, e = run["metrics"], run["efficiency"]
            rows.append(
                {
                    "method": method,
                    "accuracy": m["accuracy"],
                    "pope_f1": m.get("pope_f1", float("nan")),
                    "pope_yes_ratio": m.get("pope_yes_ratio", float("nan")),
                    "chair_i": m.get("chair_i", float("nan")),
                    "chair_s": m.get("chair_s", float("nan")),
                    "describe": m.get("acc_describe", float("nan")),
                    "decode_ms_per_token": e["decode_ms"] / max(e["new_tokens"], 1e-9),
                    "flops_ratio": e["flops_ratio"],
                }
            )
    columns = [
        ("method", "method", "s"),
        ("accuracy", "QA accuracy", ".1%"),
        ("pope_f1", "POPE F1", ".3f"),
        ("pope_yes_ratio", "yes ratio", ".2f"),
        ("chair_i", "CHAIR_i", ".3f"),
        ("chair_s", "CHAIR_s", ".3f"),
        ("describe", "exact descr.", ".1%"),
        ("decode_ms_per_token", "decode ms/token", ".2f"),
        ("flops_ratio", "prefill FLOPs", ".1%"),
    ]
    print(format_rows(rows, columns))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    stamp = {
        "date": datetime.date.today().isoformat(),
        "device": f"cpu ({platform.machine()}), {torch.get_num_threads()} threads",
        "rows": args.rows,
    }
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*stamp, *rows[0]])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
