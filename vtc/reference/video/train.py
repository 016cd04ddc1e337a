"""Train the video reference VLM from scratch on ShapesQA-Video; about 30 minutes on a quiet 2-core CPU.

    python -m vtc.reference.video.train --out vtc/reference/video/weights

Every clip is drawn from a seed of the training stream (disjoint from the held-out splits), the model
starts from ``torch.manual_seed(seed)``, the thread count is fixed and every step runs in float32, so a
rerun writes the same bytes. Two stages: the tower alone learns to name each patch's colour and shape on
single frames (cheap: no language model), then the whole model learns the questions, with the per-token
targets of :mod:`vtc.reference.video.targets` beside the answers. At the end it scores the ``val``
split (drawn in memory: the clips a split's lossless videos decode to) and writes the weights (fp16
safetensors), the tokenizer and processor configs, the log and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtc.eval import shapesqa, shapesqa_video
from vtc.progress import eta
from vtc.reference.runlog import RunLog
from vtc.reference.targets import answer_labels
from vtc.reference.train import answer_loss, learning_rate, tower_loss
from vtc.reference.video import targets
from vtc.reference.video.model import (
    FRAMES,
    PATCH,
    VIDEO_TOKEN,
    build_model,
    build_tokenizer,
    pixel_values,
    prompt,
    save_processor,
    video_inputs,
)

TOWER_BATCH = 32  # frames per step of the tower-only stage
CELL = 2 * PATCH  # pixels a pooled token covers


def tower_stream(seed: int, step: int, j: int) -> int:
    """The seed of the ``j``-th clip of tower step ``step``: apart from the conversations' seeds."""
    return seed * 100_000_000 + 90_000_000 + step * TOWER_BATCH + j


def training_batch(
    tokenizer: Any, step: int, batch: int, seed: int, turns: int = 6, with_frames: bool = False
) -> dict[str, Any]:
    """Clips ``step * batch ...`` of the stream, each with up to ``turns`` questions, and every target.

    Besides the model's inputs: ``labels`` / ``answer_weights`` (:func:`answer_labels`), ``cells`` (the
    :func:`targets.cell_targets` of each clip, stacked ``[B, frames * cells]``), ``newline``
    (:func:`targets.newline_targets`, stacked), ``early`` (``[B, T]``: the answer word's id at the shape
    word a direction or end question names, else IGNORE), ``routes`` (:func:`targets.attention_targets`),
    ``conversations`` and, ``with_frames``,
    ``frames`` (:func:`targets.frame_targets` of every frame, stacked ``[B * frames, ...]``).
    """
    clips, scenes, texts, conversations, cells, newline, frames = [], [], [], [], [], [], []
    for j in range(batch):
        clip, examples = shapesqa_video.sample_conversation(seed * 100_000_000 + step * batch + j)
        examples = examples[:turns]
        first, *rest = examples
        text = f"{prompt(first.question)} {first.answer} {tokenizer.eos_token}"
        text += "".join(f" USER: {ex.question} ASSISTANT: {ex.answer} {tokenizer.eos_token}" for ex in rest)
        clips.append(shapesqa_video.render(clip))
        scenes.append(clip)
        texts.append(text)
        conversations.append(examples)
        cells.append(targets.cell_targets(clip, CELL))
        newline.append(targets.newline_targets(clip))
        if with_frames:
            frames += [targets.frame_targets(clip, t, PATCH) for t in range(FRAMES)]
    inputs: dict[str, Any] = video_inputs(tokenizer, clips, texts)
    inputs["labels"], inputs["answer_weights"] = answer_labels(inputs["input_ids"], tokenizer)
    early = torch.full_like(inputs["input_ids"], targets.IGNORE)
    for i, (row, examples) in enumerate(zip(inputs["input_ids"].tolist(), conversations, strict=True)):
        for at, ex in zip(targets.name_positions(row, examples, tokenizer), examples, strict=True):
            if at is not None:
                early[i, at] = tokenizer.convert_tokens_to_ids(ex.answer)
    inputs["early"] = early
    inputs["routes"] = targets.attention_targets(inputs["input_ids"], scenes, conversations, tokenizer, CELL)
    inputs["cells"] = {k: torch.stack([c[k] for c in cells]) for k in cells[0]}
    inputs["newline"] = {k: torch.stack([n[k] for n in newline]) for k in newline[0]}
    if with_frames:
        inputs["frames"] = {k: torch.stack([f[k] for f in frames]) for k in frames[0]}  # [B * frames, ...]
    inputs["conversations"] = conversations
    return inputs


BINS = 12  # a shape's centre is named to within a twelfth of the frame (8 pixels) on each axis


def centre_loss(logits: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Cross entropy of ``[..., 2 * BINS]`` logits against the bins of ``[..., 2]`` centres (NaN: ignored).

    Classes rather than a regression: a regression of where a shape is stayed about a pooled token's
    width off; bins ask for the place to within a patch.
    """
    on = ~centre[..., 0].isnan()
    bins = (centre[on] * BINS).long().clamp(0, BINS - 1)  # [M, 2]
    picked = logits[on].reshape(-1, 2, BINS)  # [M, 2, BINS]
    return torch.nn.functional.cross_entropy(picked.transpose(1, 2), bins)


def video_states(hidden: torch.Tensor, is_video: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]`` hidden states -> ``[B, N, D]`` at the video's tokens (every row has N, in order)."""
    return hidden[is_video].reshape(len(hidden), -1, hidden.shape[-1])


def val_rows(n: int) -> tuple[list[dict], list[Any]]:
    """The first ``n`` rows of the ``val`` split and their clips' frames, drawn in memory."""
    rows, clips = [], []
    for row, clip in shapesqa_video.split_rows("val", n):
        rows.append(row)
        clips.append(shapesqa_video.render(clip))
    return rows, clips


@torch.no_grad()
def predict(model: Any, tokenizer: Any, questions: list[str], clips: list[Any], batch_size: int = 16) -> list[str]:
    """Greedy answers (stock ``generate``, left padding) to one question per clip, in order."""
    out: list[str] = []
    for i in range(0, len(questions), batch_size):
        inputs = video_inputs(tokenizer, clips[i : i + batch_size], [prompt(q) for q in questions[i : i + batch_size]])
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.reference.video.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the weights, processor, log and metrics")
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--turns", type=int, default=6, help="questions per clip (the conversation's first ones)")
    p.add_argument("--text-layers", type=int, default=4, help="layers of the language model")
    p.add_argument("--text-width", type=int, default=192, help="hidden size of the language model")
    p.add_argument("--history-layer", type=int, default=1, help="the layer whose first head looks back along a track")
    p.add_argument("--fetch-layer", type=int, default=2, help="the layer whose first head fetches what is asked")
    p.add_argument("--probe-weight", type=float, default=1.0, help="weight of the per-token probes")
    p.add_argument("--attend-weight", type=float, default=1.0, help="weight of the attention routes")
    p.add_argument("--tower-steps", type=int, default=500, help="steps (of 32 frames) training the tower alone")
    p.add_argument("--train-tower", action="store_true", help="keep training the tower after its own stage")
    p.add_argument("--threads", type=int, default=1, help="torch threads; fixed so reruns retrace the run")
    p.add_argument("--eval-every", type=int, default=0, help="probe val every N steps (0: never)")
    p.add_argument("--eval-rows", type=int, default=400, help="rows of the val split scored at the end")
    p.add_argument("--quiet", action="store_true", help="no progress lines on the console (the log keeps them)")
    args = p.parse_args(argv)

    threads = torch.get_num_threads()  # restored at the end: a caller's (a test's) count is its own
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    say = RunLog(out, "vtc.reference.video.train", argv, quiet=args.quiet, threads=args.threads)
    tok = build_tokenizer()
    # The attention routes need attention weights, which only the eager implementation returns.
    attn = "eager" if args.attend_weight > 0 else "sdpa"
    model = build_model(args.seed, attn, text_layers=args.text_layers, text_width=args.text_width).train()
    probe_layer, early_layer = args.history_layer + 1, args.fetch_layer + 1
    say(f"parameters: {sum(q.numel() for q in model.parameters()):,}")
    video_id = tok.convert_tokens_to_ids(VIDEO_TOKEN)
    vision, width = model.config.vision_config, model.config.text_config.hidden_size
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    tower_out: list[torch.Tensor] = []
    hook = layers[-1].register_forward_hook(lambda m, a, o: tower_out.append(o[0] if isinstance(o, tuple) else o))
    # Probes, dropped after training: the tower's per-patch targets (targets.frame_targets), where a visual
    # token's shape is (at the embeddings), its frame (after the first layer), its shape's direction (after
    # the history layer) and the newline's count of shapes (there too).
    n_shapes, n_dirs = len(shapesqa.SHAPES), len(shapesqa_video.DIRECTIONS)
    probes = torch.nn.ModuleDict(
        {
            "tower": torch.nn.Linear(vision.hidden_size, 2 * (1 + n_shapes) + 2 * BINS + 1),
            "centre": torch.nn.Linear(width, 2 * BINS),
            "time": torch.nn.Linear(width, FRAMES),
            "direction": torch.nn.Linear(width, n_dirs),
            "count": torch.nn.Linear(width, shapesqa_video.MAX_OBJECTS),
        }
    )

    def tower_losses(features: torch.Tensor, frames: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tower probe's loss on ``[N, P, hidden]`` features: classes, centres (on shapes), the clock."""
        out = probes["tower"](features)  # [N, P, 14 + 2 * BINS + 1]
        loss = tower_loss(out[..., : 2 * (1 + n_shapes)], frames["classes"])
        loss = loss + centre_loss(out[..., 2 * (1 + n_shapes) : -1], frames["centre"])
        return loss + torch.nn.functional.binary_cross_entropy_with_logits(out[..., -1], frames["clock"])

    color_ids = torch.tensor(tok.convert_tokens_to_ids(list(shapesqa.COLORS)))
    shape_ids = torch.tensor(tok.convert_tokens_to_ids(list(shapesqa.SHAPES)))
    params = [*model.named_parameters(), *(("probe." + n, q) for n, q in probes.named_parameters())]
    language = {n for n, _ in params if n.startswith(("model.language_model", "lm_head"))}
    clipped = [[q for n, q in params if n in language], [q for n, q in params if n not in language]]
    opt = torch.optim.AdamW(
        [
            {"params": [q for _, q in params if q.ndim >= 2], "weight_decay": 0.05},
            {"params": [q for _, q in params if q.ndim < 2], "weight_decay": 0.0},
        ]
    )
    rows, clips = val_rows(args.eval_rows)

    def validate(n: int) -> dict[str, float]:
        model.eval()
        preds = predict(model, tok, [r["question"] for r in rows[:n]], clips[:n])
        model.train()
        return shapesqa_video.score(rows[:n], preds)

    started = time.perf_counter()
    for step in range(args.tower_steps):  # the tower alone first: shapes are the slowest thing it learns
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        images, frames = [], []
        for j in range(TOWER_BATCH):  # one frame of a clip, where at least one shape is visible
            rng = random.Random(tower_stream(args.seed, step, j))
            clip = shapesqa_video.sample_clip(rng)
            t = rng.choice([t for t in range(clip.frames) if clip.scene(t).objects])
            images.append(shapesqa_video.render_frame(clip, t))
            frames.append(targets.frame_targets(clip, t, PATCH))
        tower_out.clear()
        tower(pixel_values([np.stack(images)])[0])  # [32, 3, H, W]
        loss = tower_losses(tower_out[-1], {k: torch.stack([f[k] for f in frames]) for k in frames[0]})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clipped[1], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.tower_steps - 1:
            seconds = time.perf_counter() - started
            left = eta(seconds, step + 1, args.tower_steps)
            say(f"tower {step:5d}  loss {loss.item():.4f}  {seconds:6.0f} s  (tower ETA {left})")
    if not args.train_tower:  # fixed from here on: no backward through it (most of a step's cost otherwise)
        for q in tower.parameters():
            q.requires_grad_(False)

    tower_seconds = time.perf_counter() - started
    routes_at = {"history": args.history_layer, "fetch": args.fetch_layer, "relay": args.fetch_layer + 1}
    running: dict[str, float] = {}
    ce = torch.nn.functional.cross_entropy
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = training_batch(tok, step, args.batch, args.seed, args.turns, with_frames=args.train_tower)
        labels, weights, early = batch.pop("labels"), batch.pop("answer_weights"), batch.pop("early")
        cells, newline, frames = batch.pop("cells"), batch.pop("newline"), batch.pop("frames", None)
        batch.pop("conversations")
        tower_out.clear()
        routes = batch.pop("routes")
        output = model(**batch, output_hidden_states=True, output_attentions=args.attend_weight > 0)
        losses = {"answers": answer_loss(output.logits, labels, weights)}
        is_video = batch["input_ids"] == video_id
        embedded = video_states(output.hidden_states[0], is_video)  # [B, frames * cells + 1, D]
        probed = video_states(output.hidden_states[probe_layer], is_video)
        timed = probes["time"](video_states(output.hidden_states[1], is_video)[:, :-1])  # [B, N, frames]
        frame_of = torch.arange(FRAMES).repeat_interleave(timed.shape[1] // FRAMES)  # [N]: each token's frame
        losses["time"] = ce(timed.flatten(0, 1), frame_of.repeat(len(labels)))
        words = embedded[:, :-1] @ model.get_input_embeddings().weight.T  # [B, N, V]: the tokens as words
        losses["align"] = (
            ce(words[..., color_ids].flatten(0, 1), cells["color"].flatten(), ignore_index=targets.IGNORE)
            + ce(words[..., shape_ids].flatten(0, 1), cells["shape"].flatten(), ignore_index=targets.IGNORE)
        ) / 2
        losses["centre"] = centre_loss(probes["centre"](embedded[:, :-1]), cells["centre"])
        losses["direction"] = ce(
            probes["direction"](probed[:, :-1]).flatten(0, 1), cells["direction"].flatten(), ignore_index=targets.IGNORE
        )
        losses["count"] = ce(probes["count"](probed[:, -1]), newline["count"])
        if args.attend_weight > 0:
            for route, layer in routes_at.items():
                index, keys = routes[route]
                if len(index):
                    weights_ = output.attentions[layer][index[:, 0], 0, index[:, 1]]  # [N, T]: the first head's
                    found = (weights_ * keys).sum(dim=1)
                    losses[route] = args.attend_weight * -torch.log(found + 1e-6).mean()
        at = early != targets.IGNORE
        if at.any():
            middle = output.hidden_states[early_layer][at]
            losses["early"] = ce(model.lm_head(model.model.language_model.norm(middle)), early[at])
        if args.train_tower:  # the tower keeps naming each patch while the rest learns
            losses["tower"] = tower_losses(tower_out[-1], frames)
        loss = losses["answers"] + sum(
            v * (1.0 if k in routes_at else args.probe_weight) for k, v in losses.items() if k != "answers"
        )
        loss.backward()
        for part in clipped:  # apart, so that the language model's gradients do not shrink the tower's
            torch.nn.utils.clip_grad_norm_([q for q in part if q.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k, v in losses.items():
            running[k] = v.item() if k not in running else 0.95 * running[k] + 0.05 * v.item()
        if step % 25 == 0 or step == args.steps - 1:
            lr, seconds = opt.param_groups[0]["lr"], time.perf_counter() - started
            parts = "  ".join(f"{k} {v:.3f}" for k, v in running.items())
            left = eta(seconds - tower_seconds, step + 1, args.steps)
            say(f"step {step:5d}  {parts}  lr {lr:.2e}  {seconds:6.0f} s  (ETA {left})")
        if args.eval_every and step and step % args.eval_every == 0 and step < args.steps - 1:
            probe = validate(min(len(rows), 160))
            say(f"step {step:5d}  val[:160] " + "  ".join(f"{k} {v:.3f}" for k, v in probe.items() if k != "n"))
    train_s = time.perf_counter() - started
    hook.remove()

    metrics = validate(len(rows))
    model.eval()
    metrics.update(train_seconds=round(train_s), steps=args.steps, batch=args.batch, seed=args.seed)
    say("val: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    model.to(torch.float16).save_pretrained(out)
    save_processor(tok, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    say(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    say.close()
    torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
