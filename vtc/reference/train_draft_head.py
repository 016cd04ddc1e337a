"""Train an MSD / EAGLE-style draft head for the reference model by self-distillation, on 1 CPU thread.

    python -m vtc.reference.train_draft_head --out vtc/reference/draft_head

1. *Data.* Scenes of ShapesQA's training stream (seeds apart from the reference model's own training and
   from the held-out splits), three in four asked to be described (the longest answers, where drafting
   pays) and the rest a question of a random type. The frozen reference model answers them greedily
   (stock ``generate``); one more forward over prompt and answer records, at every position, the input
   embedding (the projected image features at visual positions) and the final norm's output: exactly
   what the head reads while drafting (``vtc.methods.drafts.HeadDraft``).
2. *Training.* The head (``vtc.methods.draft_head.DraftHead``) learns, at every answer position, the
   target's next-next token (cross entropy through the target's frozen final LM head) and the target's
   next hidden state (smooth L1). While drafting, tokens after the first of a round are drafted from the
   head's own estimates, so the loss is also taken ``--unroll`` - 1 more times with the answer
   positions' states replaced by the previous pass's estimates (EAGLE-3's training-time test, simplified:
   every answer position is estimated, not only the current round's).
3. *Check.* Speculative decoding with the trained head on held-out ``val`` descriptions: tokens per
   target forward at k = 4 (outputs must equal stock greedy), into ``metrics.json``.

Data, initialisation and order are seeded and the thread count is fixed, so a rerun writes the same
bytes. ``--out`` gets ``config.json``, ``model.safetensors`` (fp16), ``train_log.txt`` (with the command)
and ``metrics.json``; load the head with ``DraftHead.load(folder)``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vtc
from vtc.adapters import adapter_for
from vtc.eval import shapesqa
from vtc.methods.draft_head import DraftHead
from vtc.progress import eta
from vtc.reference import evaluate
from vtc.reference import model as reference
from vtc.reference.runlog import RunLog

HEAD_WEIGHTS = Path(__file__).parent / "draft_head"
STREAM = 300_000_000  # the head's scenes: apart from the reference model's (below 10^8 and at 9 x 10^7)


def load_head(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> DraftHead:
    """The shipped draft head (or the one at `path`)."""
    return DraftHead.load(HEAD_WEIGHTS if path is None else path, dtype=dtype)


def questions(seed: int, start: int, n: int, describe_share: float) -> list[tuple[Any, shapesqa.Example]]:
    """Scenes and questions ``start .. start + n`` of the head's stream; a share of them descriptions."""
    out = []
    for i in range(start, start + n):
        describe = (i % 100) < round(100 * describe_share)
        out.append(shapesqa.sample_example(STREAM + seed * 10_000_000 + i, "describe" if describe else None))
    return out


class Recorder:
    """Forward hooks on the target's language model: its input embeddings and its final norm's output."""

    def __init__(self, model: nn.Module) -> None:
        adapter = adapter_for(model)
        self.embeds: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

        def embedded(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.embeds = kwargs.get("inputs_embeds")

        def normed(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.features = output

        self.hooks = [
            adapter.text_model.register_forward_pre_hook(embedded, with_kwargs=True),
            adapter.final_norm.register_forward_hook(normed),
        ]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def distill_batch(model: nn.Module, processor: Any, examples: list, max_new_tokens: int) -> dict[str, torch.Tensor]:
    """The target's greedy answers to `examples` and what the head reads along them.

    Returns ``ids`` / ``mask`` / ``answer`` ``[B, T]`` (answer: the generated tokens up to and including
    ``</s>``), ``positions`` ``[B, T]``, ``features`` and ``embeds`` ``[B, T, d]``.
    """
    images = [shapesqa.render(scene) for scene, _ in examples]
    inputs = processor(images=images, text=[reference.prompt(ex.question) for _, ex in examples], return_tensors="pt",
                       padding=True)  # fmt: skip
    width = inputs["input_ids"].shape[1]
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = ids[:, width:]
    eos = model.generation_config.eos_token_id
    ended = (new == eos).long()
    answer = (ended.cumsum(1) - ended) == 0  # up to and including the first </s>
    mask = torch.cat([inputs["attention_mask"], answer.long()], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    recorder = Recorder(model)
    try:
        model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=mask, position_ids=positions,
              use_cache=False)  # fmt: skip
    finally:
        recorder.remove()
    answer = torch.cat([torch.zeros_like(inputs["attention_mask"], dtype=torch.bool), answer], dim=1)
    return {"ids": ids, "mask": mask, "answer": answer, "positions": positions,
            "features": recorder.features.float(), "embeds": recorder.embeds.float()}  # fmt: skip


def head_losses(
    head: DraftHead, lm_head: nn.Module, batch: dict[str, torch.Tensor], unroll: int, feature_weight: float
) -> tuple[torch.Tensor, list[float]]:
    """The loss of one batch and the share of answer tokens the head gets right at each unrolled pass.

    Pair ``t`` is ``(h_t, e_{t+1})``; its estimate should be ``h_{t+1}`` and its token ``x_{t+2}``. Scored
    where both ``t + 1`` and ``t + 2`` are answer tokens (the pairs a draft is read from).
    """
    features, embeds, ids = batch["features"], batch["embeds"], batch["ids"]
    mask, answer, positions = batch["mask"], batch["answer"], batch["positions"]
    pairs_in = features[:, :-1]  # h_t
    following = embeds[:, 1:]  # e_{t+1}
    scored = answer[:, 1:-1] & answer[:, 2:]  # [B, T - 2]
    labels = ids[:, 2:][scored]
    truth = features[:, 1:-1][scored]
    estimated = answer[:, :-1]  # positions t whose state a draft estimates (every answer token)
    loss = features.new_zeros(())
    right = []
    for step in range(unroll):
        estimate, _ = head(pairs_in, following, mask[:, :-1], positions[:, :-1], use_cache=False)  # [B, T-1, d]
        at = estimate[:, :-1][scored]  # [N, d]
        logits = lm_head(at)
        loss = loss + nn.functional.cross_entropy(logits, labels)
        loss = loss + feature_weight * nn.functional.smooth_l1_loss(at, truth)
        right.append((logits.argmax(-1) == labels).float().mean().item())
        if step + 1 < unroll:  # next pass: answer positions read the estimate made one position before
            shifted = torch.cat([pairs_in[:, :1], estimate[:, :-1]], dim=1)
            pairs_in = torch.where(estimated[..., None], shifted, features[:, :-1])
    return loss / unroll, right


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def tokens_per_forward(model: nn.Module, processor: Any, head: DraftHead, rows: int, k: int, root: str) -> dict:
    """Speculative decoding with `head` on `rows` held-out ``val`` descriptions, batch 1, up to 32 tokens;
    every output must equal stock greedy ``generate``'s."""
    shapesqa.write_split(root, "val", rows * len(shapesqa.TYPES))
    described = [r for r in shapesqa.read_split(root, "val") if r["type"] == "describe"][:rows]
    batches = [evaluate.inputs_for(processor, [row], root) for row in described]
    settings = {"max_new_tokens": 32, "do_sample": False}
    expected = [model.generate(**inputs, **settings) for inputs in batches]
    tokens = forwards = 0
    with vtc.apply(model, "specdec", draft=head, k=k) as handle:
        for inputs, want in zip(batches, expected, strict=True):
            if not torch.equal(model.generate(**inputs, **settings), want):
                raise SystemExit("the head's speculative output differs from greedy generate: a bug in the loop")
            stats = handle.stats.speculative
            tokens, forwards = tokens + stats.tokens, forwards + stats.rounds + 1
    return {"val_rows": len(described), "k": k, "tokens_per_target_forward": round(tokens / forwards, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.reference.train_draft_head", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the head's weights, config, log and metrics")
    p.add_argument("--model", default=None, help="the target (default: the shipped reference model)")
    p.add_argument("--examples", type=int, default=3072, help="questions answered by the target for training")
    p.add_argument("--describe-share", type=float, default=0.75, help="share of them that ask for a description")
    p.add_argument("--gen-batch", type=int, default=32, help="rows per generate call while making the data")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--unroll", type=int, default=3, help="passes per step; later ones read the head's estimates")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the hidden-state loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads; fixed so reruns retrace the run")
    p.add_argument("--check-rows", type=int, default=16, help="held-out descriptions for the final check (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on the console (the log file keeps them)")
    args = p.parse_args(argv)
    if args.examples < args.batch or args.gen_batch < 1 or args.unroll < 1:
        p.error("--examples must be at least --batch, and --gen-batch and --unroll at least 1")

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    say = RunLog(out, "vtc.reference.train_draft_head", argv, quiet=args.quiet, threads=args.threads)
    model, processor = reference.load(args.model)
    for param in model.parameters():
        param.requires_grad_(False)
    lm_head = adapter_for(model).lm_head

    started = time.perf_counter()
    data = []
    for start in range(0, args.examples, args.gen_batch):
        n = min(args.gen_batch, args.examples - start)
        examples = questions(args.seed, start, n, args.describe_share)
        made = distill_batch(model, processor, examples, args.max_new_tokens)
        for r in range(n):  # one row each: batches are re-formed from rows of one prompt width below
            data.append({key: value[r] for key, value in made.items()})
        if start // args.gen_batch % 16 == 0:
            seconds = time.perf_counter() - started
            left = eta(seconds, start + n, args.examples)
            say(f"data {start + n:5d} / {args.examples}  {seconds:6.0f} s  (ETA {left})")
    data_s = time.perf_counter() - started
    answers = sum(int(row["answer"].sum()) for row in data)
    say(f"data: {len(data)} answers, {answers} answer tokens, {data_s:.0f} s")

    torch.manual_seed(args.seed)
    head = DraftHead.for_target(model).float()
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(args.seed)
    running, right_running = None, None
    queue: list[int] = []
    train_started = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        if len(queue) < args.batch:
            queue += torch.randperm(len(data), generator=order).tolist()
        picked, queue = queue[: args.batch], queue[args.batch :]
        batch = collate([data[i] for i in picked])
        loss, right = head_losses(head, lm_head, batch, args.unroll, args.feature_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if right_running is None:
            right_running = right
        else:
            right_running = [0.95 * a + 0.05 * b for a, b in zip(right_running, right, strict=True)]
        if step % 50 == 0 or step == args.steps - 1:
            seconds = time.perf_counter() - train_started
            passes = "  ".join(f"{a:.3f}" for a in right_running)
            say(
                f"step {step:5d}  loss {running:.4f}  next-next token right (pass 1..{args.unroll}) {passes}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {seconds:6.0f} s  (ETA {eta(seconds, step + 1, args.steps)})"
            )
    train_s = time.perf_counter() - train_started
    head.eval()
    head.save(out)
    metrics: dict[str, Any] = {"data_seconds": round(data_s), "train_seconds": round(train_s), "steps": args.steps,
                               "examples": args.examples, "seed": args.seed}  # fmt: skip
    if args.check_rows:
        shipped = DraftHead.load(out)  # what ships: the fp16 weights, read back
        with tempfile.TemporaryDirectory() as root:
            metrics.update(tokens_per_forward(model, processor, shipped, args.check_rows, 4, root))
    say("metrics: " + json.dumps(metrics))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    say(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    say.close()
    return 0


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows of different widths in one batch: each left-padded to the widest (padding is masked out)."""
    width = max(row["ids"].shape[0] for row in rows)
    batch = {}
    for key in rows[0]:
        parts = []
        for row in rows:
            value = row[key]
            pad = width - value.shape[0]
            parts.append(torch.cat([value.new_zeros((pad, *value.shape[1:])), value]) if pad else value)
        batch[key] = torch.stack(parts)
    return batch


if __name__ == "__main__":
    raise SystemExit(main())
