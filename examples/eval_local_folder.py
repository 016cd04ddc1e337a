"""Evaluate a model dense and pruned on a dataset folder on your disk, through vtc's Python API.

The folder holds ``test.jsonl`` (one question per line, its image path relative to the folder) and the
images: the layout ``vtc eval --data`` reads. Without ``--data`` the script writes a small ShapesQA
split to ``<out>/data`` first. Each method's run is a resumable ``<out>/runs/shapesqa/<method>/``
(predictions.jsonl and run.json); the script ends with the same markdown table ``vtc report`` prints.
The command-line equivalent: ``vtc eval --model reference --tasks shapesqa --data shapesqa=FOLDER
--method dense,dart.r64``.

    python examples/eval_local_folder.py
    python examples/eval_local_folder.py --data my_shapesqa --methods dart.r64,sparsevlm.r64 --rows 50
"""

import argparse
from pathlib import Path

from vtc.eval import shapesqa
from vtc.eval.data import load_docs
from vtc.eval.report import markdown
from vtc.eval.runner import run_task
from vtc.eval.tasks import get_task
from vtc.reference import model as reference

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", type=Path, help="a folder with test.jsonl and its images (default: write ShapesQA)")
parser.add_argument("--methods", default="dart.r64", help="comma-separated specs; dense always runs first")
parser.add_argument("--rows", type=int, default=20, help="questions to evaluate")
parser.add_argument("--batch-size", type=int, default=10)
parser.add_argument("--out", type=Path, default=Path("eval_out"))
args = parser.parse_args()

task = get_task("shapesqa")
data = args.data
if data is None:
    data = args.out / "data"
    shapesqa.write_split(data, "test", args.rows)  # test.jsonl + images/*.png
docs = load_docs(task, data, limit=args.rows)  # checks the columns the task needs, adds ids and the media root
print(f"{len(docs)} questions from {data}; first: {docs[0]['question']!r} -> {docs[0]['answer']!r}")

model, processor = reference.load()
runs = []
for method in ["dense", *args.methods.split(",")]:
    summary = run_task(
        model, processor, task, docs, method, args.out / "runs",
        batch_size=args.batch_size, model_name="reference", progress=False,
    )  # fmt: skip
    runs.append(summary)
    print(f"{method}: accuracy {summary['metrics']['accuracy']:.1%}")
print(markdown(runs))
