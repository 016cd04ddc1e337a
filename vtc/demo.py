"""``vtc demo``: vtc's main job on the embedded default, the reference model on ShapesQA.

It loads the reference LLaVA that ships with vtc (trained on ShapesQA, 144 visual tokens per image), writes
a held-out ShapesQA split, answers it dense and with every registered pruning method at three budgets, and
prints one table: accuracy, accuracy relative to dense, prefill FLOPs, prefill time and tokens kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from typing import Any

import torch

#: Visual tokens kept, as fractions of the image's tokens: the papers' 192 / 128 / 64 of 576.
BUDGETS = (192 / 576, 128 / 576, 64 / 576)


def pruning_methods() -> list[str]:
    """Registered methods that drop visual tokens (decoding methods and attention edits are left out)."""
    import vtc
    from vtc.method import get_method

    return [m for m in vtc.list_methods() if get_method(m).prunes]


def at_budget(method: str, fraction: float, n_visual: int) -> Any:
    """``method`` keeping ``fraction`` of ``n_visual`` visual tokens: by count, by ratio, or by its preset."""
    from vtc.config import resolve
    from vtc.method import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    keep = round(fraction * n_visual)
    if "keep" in fields:
        return resolve(method, keep=keep)
    if "keep_ratio" in fields:  # the ratio is floored to a count: aim at the middle of the count's interval
        return resolve(method, keep_ratio=(keep + 0.5) / n_visual)
    preset = {BUDGETS[0]: "r192", BUDGETS[1]: "r128", BUDGETS[2]: "r64"}[fraction]  # threshold methods
    return resolve(f"{method}.{preset}")


def label(config: Any) -> str:
    settings = config.to_dict()
    for key in ("keep", "keep_ratio", "global_threshold"):
        if settings.get(key) is not None:
            value = settings[key]
            shown = f"{value:.3g}" if isinstance(value, float) else value
            return f"{config.method} {key}={shown}"
    return config.method


def run(args: argparse.Namespace) -> int:
    """Answer a ShapesQA split dense and pruned; print accuracy, FLOPs, time and tokens kept."""
    import vtc
    from vtc.bench import format_rows, nothing, time_round_robin
    from vtc.eval import shapesqa
    from vtc.progress import bar
    from vtc.reference import evaluate
    from vtc.reference import model as reference

    started = time.perf_counter()
    torch.manual_seed(0)
    model, processor = reference.load(args.model)
    n_visual = model.config.image_seq_length
    methods = args.methods.split(",") if args.methods else pruning_methods()
    configs = [None] + [at_budget(m.strip(), f, n_visual) for m in methods for f in BUDGETS]
    with tempfile.TemporaryDirectory() as root:
        shapesqa.write_split(root, "test", args.rows)
        rows = shapesqa.read_split(root, "test")
        print(
            f"vtc demo: the reference LLaVA ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
            f"{n_visual} visual tokens per image) on {len(rows)} held-out ShapesQA questions, "
            f"dense and {len(configs) - 1} pruned settings."
        )
        timing_batch = evaluate.inputs_for(processor, rows[: args.batch_size], root)
        results, providers = [], {}
        shown = bar(len(configs) * len(rows), "answering", unit="q", enabled=not getattr(args, "quiet", False))
        for config in configs:
            name = "dense" if config is None else label(config)
            with vtc.apply(model, config if config is not None else "dart.noop") as handle:
                preds = evaluate.predict(model, processor, rows, root, batch_size=args.batch_size)
                with torch.no_grad():
                    model(**timing_batch, logits_to_keep=1)  # the stats of one prefill of the timing batch
                stats = handle.stats
            kept = [sum(row) / len(row) for row in stats.visual_per_layer]
            results.append((name, shapesqa.score(rows, preds), stats.flops, kept[-1], sum(kept) / len(kept)))

            def prefill(batch=timing_batch) -> None:
                with torch.no_grad():
                    model(**batch, logits_to_keep=1)

            setup = nothing if config is None else (lambda c=config: vtc.apply(model, c))
            providers[name] = (prefill, setup)
            shown.update(len(rows))
        shown.close()
        timings = time_round_robin(providers, torch.device("cpu"), warmup=1, repeats=args.repeats)

    dense = results[0][1]
    table = []
    for name, metrics, flops, last, average in results:
        table.append(
            {
                "method": name,
                "acc": metrics["accuracy"],
                "rel": metrics["accuracy"] / max(dense["accuracy"], 1e-9),
                **{t: metrics.get(f"acc_{t}", float("nan")) for t in shapesqa.TYPES},
                "flops": flops.prefill_ratio,
                "ms": timings[name].median_ms,
                "speedup": timings["dense"].median_ms / timings[name].median_ms,
                "last": last,
                "avg": average,
            }
        )
    columns = [
        ("method", "method", "s"),
        ("acc", "accuracy", ".1%"),
        ("rel", "vs dense", ".1%"),
        *[(t, t, ".0%") for t in shapesqa.TYPES],
        ("flops", "prefill FLOPs", ".1%"),
        ("ms", "prefill ms", ".1f"),
        ("speedup", "speedup", ".2f"),
        ("last", "visual kept", ".1f"),
        ("avg", "layer avg", ".1f"),
    ]
    print(format_rows(table, columns))
    print(
        f"Accuracy: greedy answers to the four question types, exact match; describe: the description names "
        f"exactly the scene's objects. Prefill FLOPs: decoder, papers' "
        f"formula, relative to dense. Time: median of {args.repeats} prefills of {len(timing_batch['input_ids'])} "
        f"prompts. Visual kept: tokens entering the last layer (of {n_visual}); layer avg: averaged over layers. "
        f"{time.perf_counter() - started:.0f} s."
    )
    return 0
