"""lmms-eval's command line vs ``vtc eval`` on the same ShapesQA rows: predictions and scores must match.

Run by ``scripts/lmms-check.sh`` (which builds .venv-lmms first)::

    python scripts/lmms_check.py --rows 12 --methods dense,dart.r64 --work /tmp/lmms-check

It exports ShapesQA's first ``--rows`` questions as a local lmms-eval task (``vtc.eval.lmms_task``),
answers them with ``vtc eval --model reference`` in this process, then with ``python -m lmms_eval
--model vtc`` (the bridge, found through vtc's entry point) once per method, and compares every row's
prediction and every exported metric. Writes ``<work>/summary.json``; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's vtc, whatever the venv has installed


def vtc_run(work: Path, data: Path, rows: int, method: str, batch_size: int) -> dict[str, Any]:
    """Predictions (by id) and metrics of ``vtc eval`` on the exported rows."""
    from vtc.cli import main
    from vtc.eval.runner import method_dir

    out = work / "vtc"
    argv = ["eval", "--model", "reference", "--tasks", "shapesqa", "--method", method, "--limit", str(rows)]
    argv += ["--data", f"shapesqa={data}", "--out", str(out), "--batch-size", str(batch_size), "--quiet"]
    if main(argv) != 0:
        raise SystemExit(f"vtc eval failed for {method}")
    run = out / "shapesqa" / method_dir(method)
    records = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((run / "run.json").read_text())["metrics"]
    return {"predictions": {r["id"]: r["prediction"] for r in records}, "metrics": metrics}


def lmms_run(work: Path, task_dir: Path, rows: int, method: str, batch_size: int, python: str) -> dict[str, Any]:
    """Predictions (by id) and metrics of ``python -m lmms_eval --model vtc`` on the exported task."""
    from vtc.eval.lmms_task import TASK
    from vtc.eval.runner import method_dir

    out = work / "lmms" / method_dir(method)
    cmd = [python, "-m", "lmms_eval", "--model", "vtc", "--model_args", f"pretrained=reference,method={method}"]
    cmd += ["--tasks", TASK, "--include_path", str(task_dir), "--limit", str(rows), "--batch_size", str(batch_size)]
    cmd += ["--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    log = work / f"lmms-{method_dir(method)}.log"
    log.write_text(done.stdout + done.stderr)
    samples = sorted(out.rglob(f"*_samples_{TASK}.jsonl"))
    results = sorted(out.rglob("*_results.json"))
    if done.returncode != 0 or not samples or not results:
        sys.stderr.write((done.stdout + done.stderr)[-4000:])
        raise SystemExit(f"lmms_eval failed for {method} (exit {done.returncode}); its output is in {log}")
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("|")))
    rows_out = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    predictions = {r["accuracy"]["id"]: r["accuracy"]["prediction"] for r in rows_out}
    scores = json.loads(results[-1].read_text())["results"][TASK]
    metrics = {k.split(",")[0]: v for k, v in scores.items() if k.endswith(",none") and "_stderr" not in k}
    return {"predictions": predictions, "metrics": metrics}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def compare(vtc: dict[str, Any], lmms: dict[str, Any], metrics: tuple[str, ...]) -> list[str]:
    """The differences between the two runs, one line each (empty when they agree)."""
    problems = []
    ids_v, ids_l = set(vtc["predictions"]), set(lmms["predictions"])
    if ids_v != ids_l:
        problems.append(f"rows differ: only vtc {sorted(ids_v - ids_l)}, only lmms-eval {sorted(ids_l - ids_v)}")
    for key in sorted(ids_v & ids_l):
        if vtc["predictions"][key] != lmms["predictions"][key]:
            problems.append(f"{key}: vtc {vtc['predictions'][key]!r} vs lmms-eval {lmms['predictions'][key]!r}")
    for m in metrics:
        a, b = vtc["metrics"].get(m, math.nan), lmms["metrics"].get(m)
        if b is None or not _same(a, b):
            problems.append(f"{m}: vtc {a} vs lmms-eval {b}")
    return problems


def main(argv: list[str] | None = None) -> int:
    from vtc.eval.lmms_task import METRICS, export

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--methods", default="dense,dart.r64")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", required=True, help="a folder for the task, both runs and summary.json")
    parser.add_argument("--lmms-python", default=str(ROOT / ".venv-lmms" / "bin" / "python"))
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    task_yaml = export(work / "task", rows=args.rows)
    summary: dict[str, Any] = {"rows": args.rows, "batch_size": args.batch_size, "methods": {}}
    failed = False
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        t0 = time.perf_counter()
        ours = vtc_run(work, task_yaml.parent / "data", args.rows, method, args.batch_size)
        t1 = time.perf_counter()
        theirs = lmms_run(work, task_yaml.parent, args.rows, method, args.batch_size, args.lmms_python)
        t2 = time.perf_counter()
        problems = compare(ours, theirs, METRICS)
        failed |= bool(problems)
        summary["methods"][method] = {
            "match": not problems,
            "problems": problems,
            "rows": len(theirs["predictions"]),
            "vtc": ours["metrics"],
            "lmms_eval": theirs["metrics"],
            "seconds": {"vtc_eval": round(t1 - t0, 1), "lmms_eval": round(t2 - t1, 1)},
        }
        verdict = "same predictions and scores" if not problems else f"{len(problems)} differences"
        print(
            f"== {method}: {len(theirs['predictions'])} rows, accuracy vtc {ours['metrics']['accuracy']:.4f} "
            f"lmms-eval {theirs['metrics'].get('accuracy')}: {verdict} "
            f"(vtc eval {t1 - t0:.0f}s, lmms_eval {t2 - t1:.0f}s)"
        )
        for line in problems:
            print(f"   {line}")
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
