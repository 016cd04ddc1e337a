"""Speculative decoding on the reference model's descriptions (its longest answers), side by side.

For each draft and k, stock greedy ``generate`` and ``specdec`` answer the same held-out ShapesQA
"describe" questions; the outputs must be identical (the script stops if not). Printed per setting:
new tokens per target forward (the prefill, which yields the first token, counted), target forwards
per token, the share of drafted tokens kept, the share of time in the draft, and the wall-clock
decode speedup over plain greedy. Rows go to benchmarks/results/specdec.csv with date, device and command.

Drafts:
- ``head``: the trained MSD / EAGLE-style draft head (``vtc/reference/draft_head``, trained by
  ``python -m vtc.reference.train_draft_head``; ``--head DIR`` for another): one decoder layer over the
  target's own hidden states and input embeddings.
- ``layers2``: the reference model cut to its first two decoder layers: a smaller VLM of the family.
- ``text``: the reference model's language model alone, as a text-only causal LM (the image left out).
- ``copy+dart``: a copy of the target whose own session keeps 10% of its visual tokens (SpecVLM's recipe).

    python benchmarks/bench_specdec.py                 # 16 questions, k = 2..6, every draft
    python benchmarks/bench_specdec.py --rows 4 --ks 2,4 --drafts layers2
    python benchmarks/bench_specdec.py --drafts head   # the trained head alone
    python benchmarks/bench_specdec.py --drafts head --ks 4 --batch-size 4 --pacing row,batch  # per-row pacing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import vtc
from vtc.bench import format_rows
from vtc.cli import append_rows, environment
from vtc.eval import shapesqa
from vtc.reference import evaluate
from vtc.reference import model as reference
from vtc.reference.train_draft_head import load_head


def layers_draft(model: nn.Module, keep: int) -> nn.Module:
    draft = copy.deepcopy(model)
    lm = draft.model.language_model
    lm.layers = nn.ModuleList(list(lm.layers)[:keep])
    text = draft.config.text_config
    text.num_hidden_layers = keep
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:keep]
    return draft.eval()


def text_draft(model: nn.Module) -> nn.Module:
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_config(model.config.text_config)
    draft.model.load_state_dict(model.model.language_model.state_dict())
    draft.lm_head.load_state_dict(model.lm_head.state_dict())
    return draft.eval()


def describe_rows(root: str, n: int) -> list[dict]:
    shapesqa.write_split(root, "test", n * len(shapesqa.TYPES))
    rows = [r for r in shapesqa.read_split(root, "test") if r["type"] == "describe"]
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16, help="held-out describe questions")
    p.add_argument("--batch-size", type=int, default=1, help="1: the latency case speculative decoding serves")
    p.add_argument("--ks", default="2,3,4,5,6")
    p.add_argument("--drafts", default="head,layers2,text,copy+dart")
    p.add_argument("--head", default=None, help="folder of a trained draft head (default: the shipped one)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--pacing", default="row", help="row, batch or both (row,batch): how rows of a batch advance")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "specdec.csv"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, processor = reference.load()
    drafts = {"layers2": lambda: layers_draft(model, 2), "text": lambda: text_draft(model)}
    drafts["head"] = lambda: load_head(args.head)
    drafts["copy+dart"] = lambda: copy.deepcopy(model)
    ks = [int(k) for k in args.ks.split(",")]
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with tempfile.TemporaryDirectory() as root:
        rows = describe_rows(root, args.rows)
        batches = [
            evaluate.inputs_for(processor, rows[i : i + args.batch_size], root)
            for i in range(0, len(rows), args.batch_size)
        ]
    print(
        f"speculative decoding on the reference model: {len(rows)} describe questions, batch {args.batch_size}, "
        f"up to {args.max_new_tokens} new tokens, greedy",
        file=sys.stderr,
    )
    with torch.no_grad():
        started = time.perf_counter()
        expected = [model.generate(**b, **settings) for b in batches]
        plain = time.perf_counter() - started
    results = []
    for name in args.drafts.split(","):
        draft = drafts[name]()
        scope = vtc.apply(draft, "dart", keep=14) if name == "copy+dart" else contextlib.nullcontext()
        with scope:
            for k, pacing in [(k, pacing) for k in ks for pacing in args.pacing.split(",")]:
                totals = {"tokens": 0, "forwards": 0, "drafted": 0, "accepted": 0, "draft_s": 0.0}
                with vtc.apply(model, "specdec", draft=draft, k=k, pacing=pacing) as handle, torch.no_grad():
                    started = time.perf_counter()
                    for batch, want in zip(batches, expected, strict=True):
                        got = model.generate(**batch, **settings)
                        if not torch.equal(got, want):
                            raise SystemExit(f"{name} k={k}: specdec's output differs from greedy generate")
                        s = handle.stats.speculative
                        totals["tokens"] += s.tokens
                        totals["forwards"] += s.rounds + 1
                        totals["drafted"] += s.drafted
                        totals["accepted"] += s.accepted
                        totals["draft_s"] += s.draft_seconds
                    seconds = time.perf_counter() - started
                results.append(
                    {
                        "draft": name, "k": k, "pacing": pacing,
                        "tokens_per_forward": totals["tokens"] / totals["forwards"],
                        "forwards_per_token": totals["forwards"] / totals["tokens"],
                        "acceptance": totals["accepted"] / max(1, totals["drafted"]),
                        "draft_share": totals["draft_s"] / seconds, "speedup": plain / seconds,
                        "plain_s": plain, "specdec_s": seconds,
                    }
                )  # fmt: skip
                print(f"{name} k={k} pacing={pacing} done", file=sys.stderr)
    columns = [
        ("draft", "draft", "s"), ("k", "k", "d"), ("pacing", "pacing", "s"),
        ("tokens_per_forward", "tokens / target forward", ".2f"),
        ("forwards_per_token", "target forwards / token", ".3f"), ("acceptance", "drafts kept", ".1%"),
        ("draft_share", "time in draft", ".1%"), ("speedup", "wall-clock speedup", ".2f"),
    ]  # fmt: skip
    print(format_rows(results, columns))
    command = "python benchmarks/bench_specdec.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {**environment(), "rows": len(rows), "batch": args.batch_size, "max_new_tokens": args.max_new_tokens}
    append_rows(Path(args.out), results, {**meta, "command": command.strip()})
    print(f"rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
