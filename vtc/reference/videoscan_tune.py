"""A short fine-tune of VideoScan's carrier path: teach a model to read its frames through the carriers.

The carrier has no parameters (the mean of its frame's tokens), so VideoScan's paper trains the language
model instead, under the attention a scan allows: frame tokens see the text before them, the carriers
of earlier frames and their own frame; everything after a frame's carrier sees the carrier and not the
frame. Here one training forward runs over the sequence a scan feeds, ``[text, frame 1, carrier 1, ...,
question, answer]``, with exactly that visibility (a 4-D mask), and the answer's cross entropy trains
the decoder layers (the vision tower, the projector and the embeddings stay frozen). The positions are
the scan's (``vtc.methods.videoscan``), so what is trained is what ``generate`` runs.

    python -m vtc.reference.videoscan_tune --model vtc/reference/video/weights --out runs/videoscan-tune

trains for at most ``--minutes`` on ShapesQA-Video's training stream, then scores held-out rows densely
and with VideoScan (carriers only, and the "+" mode) before and after, and writes ``metrics.json`` and
the tuned decoder layers (``decoder.safetensors``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vtc
from vtc import surface
from vtc.methods.videoscan import CARRIER, FRAME, TEXT, carrier_of, frame_keys, pieces


def training_batch(handle: vtc.Handle, inputs: dict[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scan's sequence of each row with its visibility, for one training forward of the bare model.

    Args:
        handle: a ``videoscan`` session on the model (it embeds the prompts with the model's vision path).
        inputs: processor outputs, prompt and answer together (left-padded rows).
        labels: ``[B, L]`` the answer's token ids where the loss applies, -100 elsewhere.

    Returns:
        ``inputs_embeds [B, L', d]``, ``attention_mask [B, 1, L', L']`` (additive: 0 where a token may
        attend), ``position_ids`` and ``labels [B, L']`` (carriers and frames unlabelled), rows right-padded.
    """
    with handle.activated(), torch.no_grad():
        embeds, visual, layout, positions = handle.session.bound.embed(**inputs)
        if positions is None:
            positions = handle.adapter.prompt_positions(inputs)
    positions = surface.position_rows(positions)
    mask = inputs["attention_mask"].bool()
    keys = frame_keys(visual, layout)
    rows = []
    for b in range(embeds.shape[0]):
        parts: list[tuple[torch.Tensor, torch.Tensor, int, int, int]] = []  # embeds, positions, label, kind, frame
        for number, (text, frame) in enumerate(pieces(keys[b], mask[b])):
            for col in text.tolist():
                parts.append((embeds[b, col], positions[..., b, col], int(labels[b, col]), TEXT, -1))
            if frame is None:
                continue
            for col in frame.tolist():
                parts.append((embeds[b, col], positions[..., b, col], -100, FRAME, number))
            carrier, centre = carrier_of(embeds[b], positions[..., b, :], frame)
            parts.append((carrier, centre, -100, CARRIER, number))
        rows.append(parts)
    width = max(len(r) for r in rows)
    batch, lead = len(rows), positions.shape[:-2]
    out_e = embeds.new_zeros(batch, width, embeds.shape[-1])
    out_p = torch.zeros(*lead, batch, width, dtype=torch.long)
    out_l = torch.full((batch, width), -100, dtype=torch.long)
    kind = torch.full((batch, width), -1, dtype=torch.long)
    frame = torch.full((batch, width), -1, dtype=torch.long)
    for b, parts in enumerate(rows):
        n = len(parts)
        out_e[b, :n] = torch.stack([p[0] for p in parts])
        out_p[..., b, :n] = torch.stack([p[1] for p in parts], dim=-1)
        out_l[b, :n] = torch.tensor([p[2] for p in parts])
        kind[b, :n] = torch.tensor([p[3] for p in parts])
        frame[b, :n] = torch.tensor([p[4] for p in parts])
    valid = kind >= 0
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    hidden = (kind == FRAME)[:, None, :] & (frame[:, :, None] != frame[:, None, :])  # [B, query, key]
    allowed = causal & valid[:, None, :] & ~hidden
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding row attends to itself (no empty softmax)
    additive = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    return {"inputs_embeds": out_e, "attention_mask": additive[:, None], "position_ids": out_p, "labels": out_l}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on the labelled tokens."""
    return nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100)


def finetune(
    model: nn.Module,
    batches: Iterable[tuple[dict[str, Any], torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-4,
    seconds: float | None = None,
) -> list[float]:
    """Train `model`'s decoder layers on scan sequences for `steps` batches (or until `seconds` pass).

    Args:
        model: a VLM of a video family, unwrapped.
        batches: ``(inputs, labels)`` pairs as ``training_batch`` takes them.
        steps: optimiser steps at most.
        lr: AdamW's learning rate (constant).
        seconds: stop after this much wall time.

    Returns:
        The loss of each step.
    """
    handle = vtc.wrap(model, "videoscan").deactivate()  # the bare model computes the loss; the session embeds
    frozen: list[nn.Parameter] = []
    try:
        layers = handle.adapter.layers
        trained = {id(p) for p in layers.parameters()}
        frozen = [p for p in model.parameters() if id(p) not in trained and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        optimiser = torch.optim.AdamW(layers.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        losses, started = [], time.perf_counter()
        for step, (inputs, labels) in enumerate(batches):
            if step >= steps or (seconds is not None and time.perf_counter() - started > seconds):
                break
            batch = training_batch(handle, inputs, labels)
            target = batch.pop("labels")
            loss = answer_loss(model(**batch).logits, target)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        handle.remove()
    return losses


# -- the reference model on ShapesQA-Video ------------------------------------------------------------------
def _examples(processor: Any, seed: int) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Training pairs from ShapesQA-Video's training stream: one question of a clip per batch."""
    from vtc.eval import runner, shapesqa_video

    tokenizer = getattr(processor, "tokenizer", processor)
    while True:
        clip, examples = shapesqa_video.sample_conversation(seed)
        seed += 1
        frames = shapesqa_video.render(clip)
        for example in examples[:1]:
            prompt = runner.build_prompt(processor, example.question, 0, video=True)
            answer = f"{example.answer}{tokenizer.eos_token or ''}"
            inputs = dict(processor(text=[prompt + answer], videos=[frames], return_tensors="pt"))
            n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[:, -n:] = inputs["input_ids"][:, -n:]
            yield inputs, labels


def accuracy(model: nn.Module, processor: Any, rows: list[tuple[dict, Any]], spec: str | None) -> float:
    """Share of held-out rows whose greedy answer's first word is the expected one."""
    from vtc.eval import runner, shapesqa_video

    tokenizer = getattr(processor, "tokenizer", processor)
    handle = vtc.wrap(model, spec) if spec else None
    right = 0
    try:
        for row, clip in rows:
            prompt = runner.build_prompt(processor, row["question"], 0, video=True)
            inputs = processor(text=[prompt], videos=[shapesqa_video.render(clip)], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip().lower()
            right += text.split()[:1] == [str(row["answer"]).lower()]
    finally:
        if handle is not None:
            handle.remove()
    return right / max(len(rows), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the video reference model's folder (or a hub id)")
    parser.add_argument("--out", required=True, help="where metrics.json and the tuned layers go")
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall time at most")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--rows", type=int, default=48, help="held-out rows scored before and after (accuracy_video.py scores more)"
    )
    parser.add_argument("--seed", type=int, default=10_000_000, help="first clip seed of the training stream")
    args = parser.parse_args(argv)
    try:
        from vtc.eval import shapesqa_video
    except ImportError:
        raise SystemExit(
            "ShapesQA-Video (vtc.eval.shapesqa_video) is not in this checkout; it is the training data."
        ) from None
    from vtc.eval import models

    torch.manual_seed(0)
    model, processor = models.load(args.model, device="cpu", dtype="float32")
    rows = list(shapesqa_video.split_rows("test", args.rows))
    specs = {"dense": None, "carriers (m64)": "videoscan.m64", "plus8": "videoscan.plus8", "plus16": "videoscan.plus16"}
    before = {name: accuracy(model, processor, rows, spec) for name, spec in specs.items()}
    losses = finetune(
        model, _examples(processor, args.seed), steps=args.steps, lr=args.lr, seconds=args.minutes * 60
    )  # fmt: skip
    after = {name: accuracy(model, processor, rows, spec) for name, spec in specs.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    layers = vtc.wrap(model, "videoscan")
    state = {k: v.contiguous() for k, v in layers.adapter.layers.state_dict().items()}
    layers.remove()
    save_file(state, str(out / "decoder.safetensors"))
    metrics = {"steps": len(losses), "losses": [losses[:1], losses[-1:]], "before": before, "after": after}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
