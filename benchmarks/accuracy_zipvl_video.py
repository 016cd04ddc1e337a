"""ZipVL's accuracy on held-out ShapesQA-Video relative to dense, in both cache modes, on the video reference model.

Runs ``vtc eval`` on the ``shapesqa_video`` task with dense, ``zipvl.t975`` (mixed-precision cache) and
``zipvl.evict`` (v2), and prints the table of accuracies; ZipVL's relative accuracy is its accuracy over
dense's. Needs the video reference model's weights (``vtc/reference/video/weights``, or a folder given
with ``--model``).

    python benchmarks/accuracy_zipvl_video.py
    python benchmarks/accuracy_zipvl_video.py --limit 200 --method dense,zipvl.t975,zipvl.t96,zipvl.evict
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vtc.cli import main

WEIGHTS = Path(__file__).resolve().parents[1] / "vtc" / "reference" / "video" / "weights"
METHODS = "dense,zipvl.t975,zipvl.evict"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(WEIGHTS), help="the video reference model's folder")
    parser.add_argument("--method", default=METHODS)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out questions")
    parser.add_argument("--batch-size", type=int, default=8)
    args, rest = parser.parse_known_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(
            f"no video reference model in {args.model}: train it (vtc.reference.video) or pass --model FOLDER "
            f"holding its config.json and weights."
        )
    command = ["eval", "--model", args.model, "--tasks", "shapesqa_video", "--method", args.method]
    command += ["--batch-size", str(args.batch_size), *(["--limit", str(args.limit)] if args.limit else []), *rest]
    raise SystemExit(main(command))
