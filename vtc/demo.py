"""``vtc demo``: vtc's main job on an embedded default model."""

from __future__ import annotations

import argparse
import time

from vtc.cli import _specs


def run(args: argparse.Namespace) -> int:
    """Wrap a built-in model with DART; print FLOPs, prefill time and agreement with the dense model."""
    import torch

    import vtc
    from vtc.adapters import adapter_class_for
    from vtc.bench import format_rows, llava_like, llava_like_sample, nothing, time_round_robin

    started = time.perf_counter()
    torch.manual_seed(0)
    model = llava_like(hidden=args.hidden, layers=args.layers)
    samples = [llava_like_sample(model, text_tokens=48 + 4 * i, seed=i) for i in range(args.prompts)]
    batch = adapter_class_for(model).collate(model, samples)  # left-padded: prompts differ in length
    print(
        f"vtc demo: a LLaVA-1.5-shaped model built in process (random weights, hidden {args.hidden}, "
        f"{args.layers} layers, 576 visual tokens per image), {args.prompts} prompts in one padded batch."
    )

    def answers() -> torch.Tensor:
        n = args.new_tokens
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, batch["input_ids"].shape[1] :]

    def prefill() -> None:
        with torch.no_grad():
            model(**samples[0], use_cache=True, logits_to_keep=1)

    specs = ["dense", *_specs(args.methods)]
    dense_answers = answers()
    results, providers = {}, {}
    for spec in specs:
        # The noop preset runs the dense computation bit for bit, and gives the dense token counts.
        with vtc.apply(model, "dart.noop" if spec == "dense" else spec) as handle:
            got = dense_answers if spec == "dense" else answers()
            prefill()
            results[spec] = (got, handle.stats.flops, handle.stats.visual_per_layer[-1][0])
        providers[spec] = (prefill, nothing if spec == "dense" else (lambda s=spec: vtc.apply(model, s)))
    timings = time_round_robin(providers, torch.device("cpu"), warmup=1, repeats=args.repeats)
    rows = []
    for spec in specs:
        got, report, kept = results[spec]
        rows.append(
            {
                "method": spec,
                "kept": kept,
                "flops": report.prefill,
                "ratio": report.prefill_ratio,
                "ms": timings[spec].median_ms,
                "speedup": timings["dense"].median_ms / timings[spec].median_ms,
                "agree1": (got[:, 0] == dense_answers[:, 0]).float().mean().item(),
                "agree_all": (got == dense_answers).all(dim=1).float().mean().item(),
            }
        )
    columns = [
        ("method", "method", "s"),
        ("kept", "visual tokens kept", "d"),
        ("flops", "prefill FLOPs", ".3g"),
        ("ratio", "FLOPs vs dense", ".1%"),
        ("ms", "prefill ms", ".1f"),
        ("speedup", "speedup", ".2f"),
        ("agree1", "same 1st token", ".0%"),
        ("agree_all", f"same {args.new_tokens} tokens", ".0%"),
    ]
    print(format_rows(rows, columns))
    print(
        "FLOPs: decoder prefill of one prompt by the papers' formula 4nd^2 + 2n^2d + 3ndm per layer. "
        f"Time: median of {args.repeats} prefills. Agreement: greedy answers equal to the dense model's "
        "(the weights are random, so this measures fidelity, not accuracy). "
        f"{time.perf_counter() - started:.0f} s."
    )
    return 0
