"""How many objects GemFilter's kept tokens still touch, on ShapesQA-hard's count questions.

A count can only survive pruning if every object keeps at least one visual token. For the first
``--questions`` count questions of the ``test`` split (the ones ``benchmarks/accuracy_hard.py`` asks, in
its order), GemFilter keeps 192, 128 and 64 of the 576 tokens, as ``vtc demo`` runs it; per budget this
prints the count's accuracy, how many answers over- and under-count, and in how many scenes the kept
tokens touch every object (an object touches a patch when it covers any pixel of it). Scenes where
an object lost all its tokens bound what any model can count at that budget.

Rows go to benchmarks/results/gemfilter_coverage.csv with the date, device and command.

    python benchmarks/gemfilter_coverage.py                       # the shipped ShapesQA-hard model
    python benchmarks/gemfilter_coverage.py --model runs/hard --questions 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BUDGETS = (192, 128, 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a reference model folder (default: the ShapesQA-hard one)")
    parser.add_argument("--questions", type=int, default=50, help="count questions (the test split's first)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "results" / "gemfilter_coverage.csv"), help="CSV to add rows to")
    args = parser.parse_args(argv)

    from accuracy_hard import load_model  # this folder is on the path when the script runs

    import vtc
    from vtc.bench import format_rows
    from vtc.cli import append_rows, environment
    from vtc.eval import shapesqa
    from vtc.reference import evaluate
    from vtc.reference import model as reference
    from vtc.reference.targets import coverage

    started = time.perf_counter()
    torch.manual_seed(0)
    model, processor = load_model(args.model)
    geometry = reference.variant_of(model)
    patch = model.config.vision_config.patch_size
    root = tempfile.TemporaryDirectory()
    n_rows = args.questions * len(shapesqa.TYPES)  # types come in turn
    shapesqa.write_split(root.name, "test", n_rows, geometry)
    scenes = [scene for _, scene in shapesqa.split_rows("test", n_rows, geometry)]
    chosen = [(row, scene) for row, scene in zip(shapesqa.read_split(root.name, "test"), scenes, strict=True)]
    chosen = [(row, scene) for row, scene in chosen if row["type"] == "count"][: args.questions]
    assert all(row["answer"] == str(len(scene.objects)) for row, scene in chosen), "rows and scenes out of step"
    touches = [coverage(scene, patch) > 0 for _, scene in chosen]  # [objects, P] per scene, for every budget

    table = []
    for keep in BUDGETS:
        right = over = under = touched_all = 0
        with vtc.apply(model, "gemfilter", keep=keep) as handle:
            for start in range(0, len(chosen), args.batch_size):
                chunk = chosen[start : start + args.batch_size]
                touch = touches[start : start + args.batch_size]
                rows = [row for row, _ in chunk]
                with torch.no_grad():
                    model(**evaluate.inputs_for(processor, rows, root.name))  # the prefill alone: what it keeps
                kept = handle.stats.kept_visual()
                answers = evaluate.predict(model, processor, rows, root.name, batch_size=args.batch_size)
                for (row, scene), objects, tokens, answer in zip(chunk, touch, kept, answers, strict=True):
                    touched_all += bool(objects[:, tokens].any(dim=1).all())
                    right += shapesqa.is_correct(row, answer)
                    word = answer.split()[0] if answer.split() else ""
                    if word.isdigit():
                        over += int(word) > len(scene.objects)
                        under += int(word) < len(scene.objects)
        n = len(chosen)
        table.append(
            {"keep": keep, "count": right / n, "over": over / n, "under": under / n, "every_object": touched_all / n}
        )
        print(f"keep {keep}: count {right}/{n}, every object touched in {touched_all}/{n}", flush=True)
    root.cleanup()

    columns = [
        ("keep", "keep of 576", "d"), ("count", "count right", ".0%"), ("over", "over-counts", ".0%"),
        ("under", "under-counts", ".0%"), ("every_object", "every object kept", ".0%"),
    ]  # fmt: skip
    print(format_rows(table, columns))
    print(f"{len(chosen)} count questions of the test split. {time.perf_counter() - started:.0f} s.")
    command = "python benchmarks/gemfilter_coverage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {**environment(), "command": command.strip(), "model": args.model or "reference-hard"}
    append_rows(Path(args.out), [{**r, "questions": len(chosen)} for r in table], meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
