"""Accuracy on held-out ShapesQA-Video relative to dense, for the video methods at three budgets.

On the video reference model (a LLaVA-OneVision, 8 frames of 16 pooled tokens and one newline per clip),
every setting answers the same held-out questions through stock ``generate``:

- ``dart`` and ``random`` with a per-frame budget (``budget_scope="frame"``): 8, 4 and 2 of each frame's
  16 tokens (DART's 4 pivots a frame become 2 at the last: its pivots are among the tokens it keeps);
- ``videoscan``: every frame's carrier plus 7, 3 and 1 of its tokens (the "+" mode: the same 8, 4 and
  2 tokens a frame), and the carriers alone (1 a frame); training-free, and with ``--tuned DIR`` also with
  the decoder layers that ``python -m vtc.reference.videoscan_tune`` wrote to DIR;
- ``zipvl`` in both cache modes (mixed precision, eviction) at tau 0.975, 0.9 and 0.8: its budget is
  adaptive, so the table shows the share of tokens it found important (mean over layers and rows).

Printed per setting: accuracy, accuracy over dense's, each question type's accuracy, the visual tokens a
frame keeps (nominal for the fixed budgets), and the KV-cache bytes after one prefill of the first
``--batch-size`` prompts relative to dense's (VideoScan's through ``vtc.stream``, which scans as
``generate`` does). Rows go to benchmarks/results/video_accuracy.csv with the date, device and command.

    python benchmarks/accuracy_video.py                       # 400 rows
    python benchmarks/accuracy_video.py --rows 100 --only dart,zipvl
    python benchmarks/accuracy_video.py --tuned runs/videoscan-tune
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Visual tokens kept per frame (of the reference model's 16) at the three budgets.
PER_FRAME = (8, 4, 2)
TAUS = (0.975, 0.9, 0.8)
FAMILIES = ("dart", "random", "videoscan", "zipvl")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the table: a name, the config (None: dense) and the decoder it runs on."""

    name: str
    budget: str
    config: Any = None
    tuned: bool = False


def settings(only: set[str], tuned: bool) -> list[Setting]:
    from vtc.config import resolve

    out = [Setting("dense", "16/16")]
    for n in PER_FRAME:
        if "dart" in only:
            config = resolve("dart", keep=n, budget_scope="frame", pivot_image_tokens=min(4, n))
            out.append(Setting("dart per frame", f"{n}/16", config))
        if "random" in only:
            out.append(Setting("random per frame", f"{n}/16", resolve("random", keep=n, budget_scope="frame")))
        if "videoscan" in only:
            config = resolve("videoscan", memory=0, keep=n - 1)
            out.append(Setting(f"videoscan carrier+{n - 1}", f"{n}/16", config))
            if tuned:
                out.append(Setting(f"videoscan carrier+{n - 1}, tuned", f"{n}/16", config, tuned=True))
    if "videoscan" in only:
        out.append(Setting("videoscan carriers", "1/16", resolve("videoscan", memory=0)))
        if tuned:
            out.append(Setting("videoscan carriers, tuned", "1/16", resolve("videoscan", memory=0), tuned=True))
    if "zipvl" in only:
        for mode in ("quant", "evict"):
            for tau in TAUS:
                out.append(Setting(f"zipvl {mode} tau={tau}", "adaptive", resolve("zipvl", tau=tau, mode=mode)))
    return out


def load_tuned(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """Load the tuned decoder layers into `model`; returns the layers' own weights, to put back."""
    from safetensors.torch import load_file

    from vtc.adapters import adapter_for

    layers = adapter_for(model).layers
    own = {k: v.clone() for k, v in layers.state_dict().items()}
    layers.load_state_dict(load_file(str(folder / "decoder.safetensors")))
    return own


def cache_bytes(model: torch.nn.Module, handle: Any, batch: dict[str, Any]) -> int:
    """KV-cache bytes after one prefill of `batch` (scanned when VideoScan runs)."""
    import vtc
    from vtc import surface
    from vtc.engine.cache import kv_nbytes

    with torch.no_grad():
        if handle is not None and handle.configs[0].method == "videoscan":
            stream = vtc.stream(handle)
            stream.push(batch)
            return kv_nbytes(stream.cache)
        return kv_nbytes(surface.output_cache(model(**batch, use_cache=True, logits_to_keep=1)))


def important_share(handle: Any) -> float:
    """ZipVL: the share of each row's tokens marked important in its last prefill, over layers and rows."""
    ratios = handle.methods[0].ratios()
    return float(torch.stack(list(ratios.values())).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the video reference model's folder (default: the shipped one)")
    parser.add_argument("--rows", type=int, default=400, help="held-out ShapesQA-Video questions")
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"methods to run, of {', '.join(FAMILIES)}")
    parser.add_argument("--tuned", default=None, help="a videoscan_tune output folder (its decoder.safetensors)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "results" / "video_accuracy.csv"), help="CSV the rows are added to")
    args = parser.parse_args(argv)
    only = {m.strip() for m in args.only.split(",") if m.strip()}
    if unknown := only - set(FAMILIES):
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))} in --only; choose from {', '.join(FAMILIES)}.")
    tuned = Path(args.tuned) if args.tuned else None
    if tuned is not None and not (tuned / "decoder.safetensors").exists():
        parser.error(f"--tuned {tuned} holds no decoder.safetensors: run python -m vtc.reference.videoscan_tune first.")

    import vtc
    from vtc.adapters import adapter_for
    from vtc.bench import format_rows
    from vtc.cli import append_rows, environment
    from vtc.eval import shapesqa_video
    from vtc.reference.video import model as reference
    from vtc.reference.video.train import predict

    started = time.perf_counter()
    torch.manual_seed(0)
    try:
        model, tokenizer = reference.load(args.model)
    except FileNotFoundError as error:
        sys.exit(f"{error} Train it with python -m vtc.reference.video.train, or pass --model FOLDER.")
    rows, clips = [], {}
    for row, clip in shapesqa_video.split_rows("test", args.rows):
        rows.append(row)
        clips[row["id"]] = shapesqa_video.render(clip)
    head = rows[: args.batch_size]
    prompts = [reference.prompt(r["question"]) for r in head]
    batch = reference.video_inputs(tokenizer, [clips[r["id"]] for r in head], prompts)
    questions, frames = [r["question"] for r in rows], [clips[r["id"]] for r in rows]

    table, own = [], None
    for setting in settings(only, tuned is not None):
        if setting.tuned and own is None:
            own = load_tuned(model, tuned)
        elif not setting.tuned and own is not None:
            adapter_for(model).layers.load_state_dict(own)
            own = None
        handle = None if setting.config is None else vtc.wrap(model, setting.config)
        try:
            predictions = predict(model, tokenizer, questions, frames, batch_size=args.batch_size)
            kv = cache_bytes(model, handle, batch)
            share = important_share(handle) if setting.config is not None and setting.config.method == "zipvl" else None
        finally:
            if handle is not None:
                handle.remove()
        metrics = shapesqa_video.score(rows, predictions)
        kept = setting.budget if share is None else f"{share:.0%} important"
        table.append(
            {"setting": setting.name, "kept": kept, "accuracy": metrics["accuracy"], "kv_bytes": kv,
             **{t: metrics.get(f"acc_{t}", float("nan")) for t in shapesqa_video.TYPES}}
        )  # fmt: skip
        print(f"{setting.name:>34}: {metrics['accuracy']:.1%}", flush=True)
    if own is not None:
        adapter_for(model).layers.load_state_dict(own)

    dense = table[0]
    for row in table:
        row["vs_dense"] = row["accuracy"] / max(dense["accuracy"], 1e-9)
        row["kv_vs_dense"] = row["kv_bytes"] / dense["kv_bytes"]
    columns = [
        ("setting", "setting", "s"), ("kept", "visual kept / frame", "s"), ("accuracy", "accuracy", ".1%"),
        ("vs_dense", "vs dense", ".1%"), *[(t, t, ".0%") for t in shapesqa_video.TYPES],
        ("kv_vs_dense", "KV/dense", ".3f"),
    ]  # fmt: skip
    print(format_rows(table, columns))
    seconds = time.perf_counter() - started
    print(f"{len(rows)} held-out questions ({len(rows) // len(shapesqa_video.TYPES)} a type); {seconds:.0f} s.")
    command = "python benchmarks/accuracy_video.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {**environment(), "command": command.strip()}
    append_rows(Path(args.out), [{**r, "rows": len(rows)} for r in table], meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
