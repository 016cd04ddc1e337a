"""Every pruning method on ShapesQA-hard at the papers' three budgets, with 95% confidence intervals.

On the ShapesQA-hard reference model (a LLaVA with 576 visual tokens per image, LLaVA-1.5's count) every
setting answers the same held-out questions through stock ``generate``: dense, then each registered
pruning method at 192, 128 and 64 of 576 tokens, at matched prefill FLOPs as ``vtc demo`` picks them
(``vtc.demo.settings_for``: each budget's target is DART keeping that many tokens, and each method gets the
keep whose planned FLOPs come nearest; MustDrop's and FocusLLaVA's merge thresholds are then raised until
their FLOPs measured on one batch reach the target; GemFilter, whose pre-pass is paid before any token goes,
keeps the budget's count).

Printed per setting: accuracy with its Wilson 95% interval, accuracy relative to dense with a paired
bootstrap 95% interval (the same questions resampled for both), each question type, the prefill FLOPs
measured on one batch relative to dense, and the visual tokens entering the last layer. The questions
are the four answered types (exist, colour, count, position) in turn; descriptions are left out.

Rows go to benchmarks/results/hard_accuracy.csv with the date, device and command; with ``--runs DIR``
each setting also writes ``DIR/shapesqa_hard/<setting>/run.json``, which ``vtc report DIR --plots P``
draws as accuracy against prefill FLOPs with the Pareto front.

    python benchmarks/accuracy_hard.py                        # 1,000 questions, every method
    python benchmarks/accuracy_hard.py --questions 200 --methods dart,gemfilter --runs runs/hard
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_model(path: str | None) -> tuple:
    """The reference model at `path` (default: the ShapesQA-hard one) and its processor; exits with the fix."""
    from vtc.reference import model as reference

    try:
        return reference.load(path or reference.HARD_WEIGHTS)
    except FileNotFoundError as error:
        sys.exit(f"{error} Pass --model FOLDER.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a reference model folder (default: the ShapesQA-hard one)")
    parser.add_argument("--questions", type=int, default=1000, help="held-out questions (a quarter of each type)")
    parser.add_argument("--methods", default="", help="comma-separated pruning methods (default: every one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", default=None, help="also write run.json files here, for `vtc report --plots`")
    parser.add_argument("--out", default=str(HERE / "results" / "hard_accuracy.csv"), help="CSV the rows are added to")
    args = parser.parse_args(argv)

    from vtc.bench import format_rows
    from vtc.cli import append_rows, environment
    from vtc.demo import answer_and_measure, pruning_methods, row_name, settings_for
    from vtc.eval import shapesqa
    from vtc.eval.scoring import paired_ratio_interval, wilson_interval
    from vtc.reference import evaluate
    from vtc.reference import model as reference

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or pruning_methods()
    if unknown := set(methods) - set(pruning_methods()):
        known = ", ".join(pruning_methods())
        parser.error(f"unknown pruning method(s) {', '.join(sorted(unknown))}; choose from {known}.")
    started = time.perf_counter()
    torch.manual_seed(0)
    model, processor = load_model(args.model)
    geometry = reference.variant_of(model)
    n_visual = model.config.image_seq_length
    root = tempfile.TemporaryDirectory()
    # Types come in turn, so 5/4 of the questions as rows leaves exactly `questions` once descriptions go.
    shapesqa.write_split(root.name, "test", args.questions * 5 // 4, geometry)
    rows = [r for r in shapesqa.read_split(root.name, "test") if r["type"] != "describe"]
    batch = evaluate.inputs_for(processor, rows[: args.batch_size], root.name)
    settings = [None, *settings_for(model, methods, n_visual, batch)]
    print(
        f"{len(rows)} held-out {geometry.name} questions, {n_visual} visual tokens per image: dense and "
        f"{len(settings) - 1} settings at matched prefill FLOPs.",
        flush=True,
    )

    table, dense_right = [], None
    for setting in settings:
        config = None if setting is None else setting.config
        name = row_name(setting)

        def answer() -> list[str]:
            return evaluate.predict(model, processor, rows, root.name, batch_size=args.batch_size)

        predictions, stats = answer_and_measure(model, config, answer, batch)
        right = [shapesqa.is_correct(r, p) for r, p in zip(rows, predictions, strict=True)]
        dense_right = right if dense_right is None else dense_right
        metrics = shapesqa.score(rows, predictions)
        low, high = wilson_interval(sum(right), len(right))
        rel_low, rel_high = paired_ratio_interval(right, dense_right)
        kept = [sum(row) / len(row) for row in stats.visual_per_layer]
        table.append(
            {
                "setting": name,
                "budget": "576/576" if setting is None else setting.budget,
                "method": "dense" if config is None else config.method,
                "keep": n_visual if config is None else config.keep,
                "accuracy": metrics["accuracy"],
                "ci_low": low,
                "ci_high": high,
                "vs_dense": metrics["accuracy"] / max(sum(dense_right) / len(dense_right), 1e-9),
                "vs_dense_low": rel_low,
                "vs_dense_high": rel_high,
                **{t: metrics[f"acc_{t}"] for t in shapesqa.QUESTION_TYPES},
                "flops": stats.flops.prefill_ratio,
                "target": 1.0 if setting is None else setting.target,
                "visual_last": kept[-1],
                "visual_avg": sum(kept) / len(kept),
            }
        )
        print(f"{name:>44}: {metrics['accuracy']:.1%}  [{low:.1%}, {high:.1%}]", flush=True)
        if args.runs:
            write_run(Path(args.runs), name, metrics, stats.flops, kept, len(rows))
    root.cleanup()

    columns = [
        ("setting", "setting", "s"), ("accuracy", "accuracy", ".1%"), ("ci_low", "95% low", ".1%"),
        ("ci_high", "95% high", ".1%"), ("vs_dense", "vs dense", ".1%"), ("vs_dense_low", "low", ".1%"),
        ("vs_dense_high", "high", ".1%"), *[(t, t, ".0%") for t in shapesqa.QUESTION_TYPES],
        ("flops", "prefill FLOPs", ".1%"), ("target", "budget's", ".1%"), ("visual_last", "visual kept", ".1f"),
        ("visual_avg", "layer avg", ".1f"),
    ]  # fmt: skip
    print(format_rows(table, columns))
    print(
        f"{len(rows)} questions; accuracy: Wilson 95% interval; vs dense: paired bootstrap 95% interval (2,000 "
        f"resamples); prefill FLOPs: measured on one batch of {len(batch['input_ids'])}. "
        f"{time.perf_counter() - started:.0f} s."
    )
    command = "python benchmarks/accuracy_hard.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {**environment(), "command": command.strip()}
    append_rows(Path(args.out), [{**r, "questions": len(rows)} for r in table], meta)
    return 0


def write_run(runs: Path, name: str, metrics: dict, flops, kept: list[float], samples: int) -> None:
    """A ``run.json`` in the layout ``vtc eval`` writes, so ``vtc report`` tables and plots the settings."""
    folder = runs / "shapesqa_hard" / name.replace("/", "of").replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": "reference-hard",
        "task": "shapesqa_hard",
        "method": name,
        "primary": "accuracy",
        "metrics": metrics,
        "efficiency": {
            "prefill_flops": flops.prefill,
            "flops_ratio": flops.prefill_ratio,
            "visual_kept": sum(kept) / len(kept),
            "prefill_ms": None,
            "samples": samples,
        },
    }
    (folder / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
