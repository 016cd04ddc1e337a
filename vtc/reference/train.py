"""Train the reference VLM from scratch on ShapesQA; finishes on a 2-core CPU in under 30 minutes.

    python -m vtc.reference.train --out vtc/reference/weights

Every example is drawn from a seed of the training stream (disjoint from the held-out splits), the model
starts from ``torch.manual_seed(seed)`` and the thread count is fixed, so a rerun retraces the same run.
At the end it scores the ``val`` split, writes the weights (fp16 safetensors), the processor, the log and
``metrics.json`` to ``--out``.

The targets each batch carries besides the answers are built in :mod:`vtc.reference.targets`; this module
holds the losses, the batches, the schedule and the loop.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from vtc.eval import shapesqa
from vtc.progress import eta
from vtc.reference import evaluate
from vtc.reference.model import IMAGE_TOKEN, build_model, build_processor, prompt
from vtc.reference.runlog import RunLog
from vtc.reference.taps import AttentionTaps
from vtc.reference.targets import (
    answer_labels,
    attention_targets,
    coverage,
    early_targets,
    filter_targets,
    patch_targets,
    relay_targets,
)
from vtc.surface import set_attention_implementation


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy on the labelled tokens, each answer weighing the same."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    w = weights[:, 1:]
    return (ce * w).sum() / w.sum()


def training_batch(
    processor,
    step: int,
    batch: int,
    seed: int,
    patch: int | None = None,
    turns: int = 1,
    describe_every: int = 0,
    geometry: shapesqa.Variant = shapesqa.STANDARD,
    type_weights: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Examples ``step * batch ...`` of the stream, with labels on the answer tokens and ``</s>`` only.

    With ``turns`` above 1, each row is a conversation about one image: the first ``turns`` questions of
    :func:`shapesqa.sample_conversation`, every answer labelled. The first turn is the single-question
    prompt the model is evaluated on; later turns reuse the image's tokens for more supervision per step.
    The description comes last in a conversation (so that no answer can be copied from it); with
    ``describe_every`` = k, every k-th row is the description alone, asked first as the evaluation asks it.
    With ``patch``, also ``patch_targets`` ``[B, 2, P]`` for the tower's auxiliary loss,
    ``attend_index`` / ``attend_patches`` / ``attend_cells`` (:func:`attention_targets`) and ``links`` /
    ``replies`` (:func:`relay_targets`), ``filter_index`` / ``filter_patches`` (:func:`filter_targets`) for
    the attention losses. Scenes are drawn in `geometry` (ShapesQA's by default). `type_weights` weighs
    each answer by its question's type (1 for a type it does not name).
    """
    tok = processor.tokenizer
    images, texts, targets, conversations, scenes = [], [], [], [], []
    for j in range(batch):
        index = seed * 100_000_000 + step * batch + j
        if turns == 1:
            scene, ex = shapesqa.sample_example(index, geometry=geometry)
            examples = [ex]
        else:
            scene, examples = shapesqa.sample_conversation(index, geometry)
            alone = describe_every and j % describe_every == describe_every - 1
            examples = examples[-1:] if alone else examples[:turns]  # the description is the last turn
        conversations.append(examples)
        scenes.append(scene)
        images.append(shapesqa.render(scene))
        if patch is not None:
            targets.append(patch_targets(scene, patch))
        first, *rest = examples
        text = f"{prompt(first.question)} {first.answer} {tok.eos_token}"
        text += "".join(f" USER: {ex.question} ASSISTANT: {ex.answer} {tok.eos_token}" for ex in rest)
        texts.append(text)
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    scales = None
    if type_weights:
        scales = [[type_weights.get(ex.type, 1.0) for ex in examples] for examples in conversations]
    inputs["labels"], inputs["answer_weights"] = answer_labels(inputs["input_ids"], tok, scales)
    inputs["early_targets"] = early_targets(inputs["input_ids"], conversations, tok)
    if patch is not None:
        inputs["patch_targets"] = torch.stack(targets)
        inputs["attend_index"], inputs["attend_patches"], inputs["attend_cells"] = attention_targets(
            inputs["input_ids"], scenes, conversations, tok, patch
        )
        inputs["links"], inputs["replies"] = relay_targets(inputs["input_ids"], scenes, conversations, tok)
        inputs["filter_index"], inputs["filter_patches"] = filter_targets(
            inputs["input_ids"], scenes, conversations, tok, patch
        )
        inputs["touched"] = torch.stack([coverage(s, patch).sum(dim=0) > 0 for s in scenes])
    return inputs


def visual_dropout(
    attention_mask: torch.Tensor,
    image_at: torch.Tensor,
    touched: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    background_share: float = 0.5,
    keep_range: tuple[float, float] = (0.08, 0.5),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hide visual tokens of some rows from the language model, as a pruning method would drop them.

    Each row is picked with probability `rate`. A share `background_share` of the picked rows loses a share
    of its background drawn uniformly from [0, 1], every token an object touches (`touched` ``[B, P]``) kept:
    what attention-scored pruners do, and what a model that counts objects by the share of the image they
    fill gets wrong. The other picked rows keep a share of all their tokens drawn from `keep_range`, at
    random. The hidden tokens are masked out as keys (the tower still sees the whole image, as it does under
    pruning); half the picked rows renumber the kept tokens' positions from 0 (GemFilter's fresh positions),
    the rest keep the original ones (DART's, SparseVLM's).

    Returns the new attention mask, the position ids ``[B, T]`` and which rows were picked ``[B]``; the
    inputs are not changed.
    """
    batch, patches = touched.shape
    picked = torch.rand(batch, generator=generator) < rate
    background = torch.rand(batch, generator=generator) < background_share
    share = torch.rand(batch, generator=generator)
    low, high = keep_range
    keep_n = ((low + (high - low) * share) * patches).round().long()
    fresh = torch.rand(batch, generator=generator) < 0.5
    noise = torch.rand(batch, patches, generator=generator)
    lose_background = ~touched & (noise < share[:, None])
    lose_any = noise.argsort(dim=1).argsort(dim=1) >= keep_n[:, None]  # all but the keep_n lowest draws
    hidden = picked[:, None] & torch.where(background[:, None], lose_background, lose_any)
    mask = attention_mask.clone()
    mask.scatter_(1, image_at, mask.gather(1, image_at) * ~hidden)
    original = torch.arange(mask.shape[1]).expand_as(mask)
    renumbered = (mask.cumsum(dim=1) - 1).clamp_min(0)
    positions = torch.where((picked & fresh)[:, None], renumbered, original)
    return mask, positions, picked


def tower_loss(aux: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The tower's per-patch loss: ``aux`` ``[B, P, 2 * classes]`` against :func:`patch_targets` ``[B, 2, P]``.

    The colour target names the background too (where objects are); the shape target is scored on object
    patches only, where all its signal is: averaged with the background, most of which is easy, it
    taught shapes several times slower.
    """
    aux = aux.float().reshape(*aux.shape[:2], 2, -1).permute(0, 3, 2, 1)  # [B, classes, 2, P]
    colors, shapes = targets.unbind(1)
    shapes = shapes.masked_fill(shapes == 0, -100)
    cross_entropy = torch.nn.functional.cross_entropy
    return cross_entropy(aux[:, :, 0], colors) + cross_entropy(aux[:, :, 1], shapes, ignore_index=-100)


TOWER_BATCH = 32  # images per step of the tower-only stage


def tower_stream(seed: int, step: int, j: int) -> int:
    """The seed of the ``j``-th scene of tower step ``step``: apart from the conversations' seeds."""
    return seed * 100_000_000 + 90_000_000 + step * TOWER_BATCH + j


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Looks:
    """The attention rows the losses read in one step, from ``output.attentions`` (eager) or `taps`.

    ``found``: head 0 of `attend_layer` from each name (``[N, T]``); ``relayed``: head 0 along each relay
    pair (one ``[N]`` per relay layer within the model); ``filtered``: the mean over heads of `filter_layer`
    from each answering token (``[N, T]``).
    """

    def __init__(
        self, taps, attend_index, relays, filter_index, attend_layer: int, filter_layer: int, num_layers: int
    ) -> None:
        relays = [(pairs, layer) for pairs, layer in relays if layer < num_layers]
        self.taps, self.attend_index, self.relays, self.filter_index = taps, attend_index, relays, filter_index
        self.attend_layer, self.filter_layer = attend_layer, filter_layer
        self.found = self.filtered = None
        self.relayed: list[torch.Tensor] = []
        if taps is not None:
            taps.clear()
            self._spans = [
                taps.ask(attend_layer, *attend_index.unbind(1)) if len(attend_index) else None,
                *[taps.ask(layer, pairs[:, 0], pairs[:, 1]) if len(pairs) else None for pairs, layer in relays],
                taps.ask(filter_layer, *filter_index.unbind(1)) if len(filter_index) else None,
            ]

    def _rows(self, output, layer: int, index: int, rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        if self.taps is None:
            return output.attentions[layer][rows, :, at].float()
        return self.taps.rows(layer, self._spans[index])

    def read(self, output) -> None:
        if len(self.attend_index):
            self.found = self._rows(output, self.attend_layer, 0, *self.attend_index.unbind(1))[:, 0]
        for k, (pairs, layer) in enumerate(self.relays, start=1):
            if len(pairs):
                self.relayed.append(self._rows(output, layer, k, pairs[:, 0], pairs[:, 1])[:, 0].gather(
                    1, pairs[:, 2:]
                )[:, 0])  # fmt: skip
        if len(self.filter_index):
            index = len(self.relays) + 1
            self.filtered = self._rows(output, self.filter_layer, index, *self.filter_index.unbind(1)).mean(dim=1)


def warm_start(model, path: str | Path) -> str:
    """Load a trained reference model's weights into `model`, interpolating the tower's position embeddings.

    A model trained at another image size has another patch grid; its grid of position embeddings is
    resized bicubically (the class position kept), as LLaVA-NeXT does for higher resolutions. Returns what
    was resized, for the log.
    """
    from vtc.reference.model import load

    state = load(path)[0].state_dict()
    mine = model.state_dict()
    resized = []
    for name, tensor in state.items():
        if name in mine and tensor.shape != mine[name].shape and name.endswith("position_embedding.weight"):
            old, new = math.isqrt(tensor.shape[0] - 1), math.isqrt(mine[name].shape[0] - 1)
            grid = tensor[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
            grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
            state[name] = torch.cat([tensor[:1].float(), grid.permute(0, 2, 3, 1).reshape(new * new, -1)])
            resized.append(f"{name} {old}x{old} -> {new}x{new}")
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"--init {path}: not a reference model of this architecture ({missing or unexpected}).")
    return "; ".join(resized) or "same geometry"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.reference.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the weights, processor, log and metrics")
    p.add_argument("--variant", choices=tuple(shapesqa.VARIANTS), default="shapesqa", help="the scenes' geometry")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--turns", type=int, default=7, help="questions per image (1: single-question rows)")
    p.add_argument("--describe-every", type=int, default=4, help="every k-th row: the description alone")
    p.add_argument("--eval-every", type=int, default=0, help="probe val every N steps (0: never)")
    p.add_argument("--text-layers", type=int, default=4, help="layers of the language model")
    p.add_argument("--text-width", type=int, default=192, help="hidden size of the language model")
    p.add_argument("--early-weight", type=float, default=1.0, help="weight of the early-answer loss")
    p.add_argument("--early-layer", type=int, default=3, help="the layer whose output answers early")
    p.add_argument("--attend-weight", type=float, default=1.0, help="weight of the attention loss")
    p.add_argument("--attend-layer", type=int, default=1, help="the layer whose first head learns to find")
    p.add_argument("--threads", type=int, default=2, help="torch threads; fixed so reruns retrace the run")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype of the steps")
    p.add_argument(
        "--attention", choices=("eager", "taps"), default="eager",
        help="how the attention losses read attention: eager (every row of every layer) or taps (sdpa, and only "
        "the rows the losses read: several times faster at 576 visual tokens)",
    )  # fmt: skip
    p.add_argument("--init", help="start from this reference model's weights (its tower's positions interpolated)")
    p.add_argument("--tower-steps", type=int, default=400, help="steps (of 32 images) training the tower alone")
    p.add_argument("--filter-weight", type=float, default=0.0, help="weight of the answering token's filter loss")
    p.add_argument("--filter-layer", type=int, default=1, help="the layer whose answering token finds the objects")
    p.add_argument("--where-weight", type=float, default=1.0, help="weight of the projector's position probe")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the tower's per-patch loss")
    p.add_argument("--align-weight", type=float, default=1.0, help="weight of the projector's word alignment")
    p.add_argument("--quiet", action="store_true", help="no progress lines on the console (the log file keeps them)")
    p.add_argument("--eval-rows", type=int, default=1000, help="rows of the val split scored at the end")
    p.add_argument(
        "--visual-dropout", type=float, default=0.0,
        help="share of rows whose visual tokens are partly hidden from the language model (visual_dropout)",
    )  # fmt: skip
    p.add_argument(
        "--background-share", type=float, default=0.5,
        help="share of the hidden rows that lose background only (the rest lose any tokens)",
    )  # fmt: skip
    p.add_argument(
        "--count-weight", type=float, default=1.0,
        help="weight of a count answer in the answer loss (every other answer weighs 1)",
    )  # fmt: skip
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    say = RunLog(out, "vtc.reference.train", argv, quiet=args.quiet, threads=args.threads)
    geometry = shapesqa.variant(args.variant)
    processor = build_processor(image_size=geometry.size)
    # The attention losses need attention weights: eager returns them all, taps the rows the losses read.
    attends = args.attend_weight > 0 or args.filter_weight > 0
    architecture = {"text_layers": args.text_layers, "text_width": args.text_width, "image_size": geometry.size}
    model = build_model(args.seed, "eager" if attends and args.attention == "eager" else "sdpa", **architecture)
    if args.init:
        say(f"initial weights: {args.init} ({warm_start(model, args.init)})")
    model.train()
    taps = AttentionTaps() if attends and args.attention == "taps" else None
    if taps is not None:
        taps.install(model.config.text_config)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    say(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    # The auxiliary head reads the tower's last layer (the features the projector takes) and is dropped
    # after training: the saved model is a stock LLaVA.
    vision = model.config.vision_config
    head = torch.nn.Linear(vision.hidden_size, 2 * (1 + len(shapesqa.SHAPES)))
    tower_out: list[torch.Tensor] = []
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    hooks = [
        layers[-1].register_forward_hook(lambda m, a, out: tower_out.append(out[0] if isinstance(out, tuple) else out)),
        model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out)),
    ]
    # The projector's output for a patch is read out through the (tied) word embeddings and trained to name
    # the colour and the shape there: visual tokens then resemble the words a question asks about.
    projected: list[torch.Tensor] = []
    tok = processor.tokenizer
    color_ids = torch.tensor(tok.convert_tokens_to_ids(list(shapesqa.COLORS)))
    shape_ids = torch.tensor(tok.convert_tokens_to_ids(list(shapesqa.SHAPES)))
    # A linear probe of the projector's output for the patch's row and column (dropped after training):
    # position questions need where each object is to survive into its visual tokens.
    g = vision.image_size // vision.patch_size
    where = torch.nn.Linear(model.config.text_config.hidden_size, 2 * g)
    grid = torch.stack([torch.arange(g * g) // g, torch.arange(g * g) % g])[None]  # [1, 2, P]: row, column
    placed = torch.nn.Linear(model.config.text_config.hidden_size, 2 * g)  # the same, at the names
    probes = {"aux": head, "where": where, "placed": placed}
    params = [*model.named_parameters()]
    params += [(f"{name}.{n}", p) for name, probe in probes.items() for n, p in probe.named_parameters()]
    language = {n for n, _ in params if n.startswith(("model.language_model", "lm_head"))}
    clipped = [[p for n, p in params if n in language], [p for n, p in params if n not in language]]
    decay = [p for n, p in params if p.ndim >= 2]
    rest = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}])
    val_root = tempfile.TemporaryDirectory()
    shapesqa.write_split(val_root.name, "val", args.eval_rows, geometry)
    val_rows = shapesqa.read_split(val_root.name, "val")

    def validate(rows: list[dict]) -> dict[str, float]:
        model.eval()
        if taps is not None:
            taps.clear()
        metrics = shapesqa.score(rows, evaluate.predict(model, processor, rows, val_root.name))
        model.train()
        return metrics

    started = time.perf_counter()
    for step in range(args.tower_steps):  # the tower alone first: shapes are the slowest thing it learns
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        scenes = [
            shapesqa.sample_scene(random.Random(tower_stream(args.seed, step, j)), geometry) for j in range(TOWER_BATCH)
        ]
        pixels = processor.image_processor([shapesqa.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        targets = torch.stack([patch_targets(s, vision.patch_size) for s in scenes])
        tower_out.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            tower(pixels)
            aux = head(tower_out[-1][:, 1:])
        loss = tower_loss(aux, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clipped[1], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.tower_steps - 1:
            seconds = time.perf_counter() - started
            left = eta(seconds, step + 1, args.tower_steps)
            say(f"tower {step:5d}  loss {loss.item():.4f}  {seconds:6.0f} s  (tower ETA {left})")

    tower_seconds = time.perf_counter() - started
    running, answers, early_running, found_running = None, None, None, None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        inputs = training_batch(
            processor, step, args.batch, args.seed, vision.patch_size, args.turns, args.describe_every, geometry,
            type_weights={"count": args.count_weight},
        )  # fmt: skip
        targets = inputs.pop("patch_targets")  # [B, 2, P]
        labels, weights = inputs.pop("labels"), inputs.pop("answer_weights")
        early = inputs.pop("early_targets")
        attend_index, attend_patches = inputs.pop("attend_index"), inputs.pop("attend_patches")
        attend_cells = inputs.pop("attend_cells")
        filter_index, filter_patches = inputs.pop("filter_index"), inputs.pop("filter_patches")
        links, replies = inputs.pop("links"), inputs.pop("replies")
        touched = inputs.pop("touched")
        image_at = (inputs["input_ids"] == image_id).nonzero()[:, 1].reshape(len(labels), -1)  # [B, P]
        if args.visual_dropout > 0:
            dice = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            inputs["attention_mask"], inputs["position_ids"], picked = visual_dropout(
                inputs["attention_mask"], image_at, touched, args.visual_dropout, dice, args.background_share
            )
            # The attention losses point at patches a hidden row may have lost: they read whole rows only.
            whole = ~picked[attend_index[:, 0]] if len(attend_index) else torch.ones(0, dtype=torch.bool)
            attend_index, attend_patches, attend_cells = attend_index[whole], attend_patches[whole], attend_cells[whole]
            links = links[~picked[links[:, 0]]] if len(links) else links
            replies = replies[~picked[replies[:, 0]]] if len(replies) else replies
            whole = ~picked[filter_index[:, 0]] if len(filter_index) else torch.ones(0, dtype=torch.bool)
            filter_index, filter_patches = filter_index[whole], filter_patches[whole]
        relays = ((links, args.attend_layer + 1), (replies, args.attend_layer + 2))
        tower_out.clear()
        projected.clear()
        looks = Looks(taps, attend_index, relays, filter_index, args.attend_layer, args.filter_layer, args.text_layers)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            output = model(
                **inputs,
                output_hidden_states=args.early_weight > 0,
                output_attentions=attends and taps is None,
            )
            looks.read(output)
            if args.early_weight > 0:  # the middle layer read through the final norm and the LM head
                at = early != -100
                middle = output.hidden_states[args.early_layer][at]
                early_logits = model.lm_head(model.model.language_model.norm(middle))
            aux = head(tower_out[-1][:, 1:])  # CLS dropped: [B, P, 2 * classes]
            words = projected[-1] @ model.get_input_embeddings().weight.T  # [B, P, V]
            where_out = where(projected[-1])  # [B, P, 2 * rows]
        loss = answer_loss(output.logits, labels, weights)
        answered = loss.item()
        if args.early_weight > 0 and at.any():
            early_loss = torch.nn.functional.cross_entropy(early_logits.float(), early[at])
            loss = loss + args.early_weight * early_loss
            early_running = (
                early_loss.item() if early_running is None else 0.95 * early_running + 0.05 * early_loss.item()
            )
        if args.attend_weight > 0 and len(attend_index):
            # The first head of one layer, from each name, onto the named object's patches.
            rows, at_token = attend_index.unbind(1)
            weights_img = looks.found  # [N, T]
            on_image = weights_img.gather(1, image_at[rows]).float()  # [N, P]
            found = (on_image * attend_patches).sum(dim=1)
            loss = loss + args.attend_weight * -torch.log(found + 1e-6).mean()
            for looked in looks.relayed:
                loss = loss + args.attend_weight * -torch.log(looked + 1e-6).mean()
            if args.where_weight > 0 and output.hidden_states is not None:  # the fetched object's cell
                fetched = output.hidden_states[args.attend_layer + 1][rows, at_token].float()
                cell_logits = placed(fetched).reshape(len(rows), 2, -1).transpose(1, 2)  # [N, rows, 2]
                loss = loss + args.where_weight * torch.nn.functional.cross_entropy(cell_logits, attend_cells)
            found_running = (
                found.mean().item() if found_running is None else 0.95 * found_running + 0.05 * found.mean().item()
            )
        if args.filter_weight > 0 and len(filter_index):
            # Every head of the filter layer, from the answering token: its attention over the image falls on
            # the question's objects (GemFilter's scores are that token's attention logits, summed over heads).
            rows, at_token = filter_index.unbind(1)
            weights_img = looks.filtered  # [N, T]
            on_image = weights_img.gather(1, image_at[rows])  # [N, P]
            share = (on_image * filter_patches).sum(dim=1) / on_image.sum(dim=1).clamp_min(1e-9)
            loss = loss + args.filter_weight * -torch.log(share + 1e-6).mean()
        loss = loss + args.aux_weight * tower_loss(aux, targets)
        if args.where_weight > 0:  # each patch's own row and column, linearly readable from its token
            where_logits = where_out.float().reshape(*where_out.shape[:2], 2, -1)
            loss = loss + args.where_weight * torch.nn.functional.cross_entropy(
                where_logits.permute(0, 3, 2, 1), grid.expand(len(labels), -1, -1)
            )
        on_object = targets - 1  # [B, 2, P]; -1 = background, ignored
        for k, ids in enumerate((color_ids, shape_ids)):
            logits = words[..., ids].float().transpose(1, 2)  # [B, classes, P]
            align = torch.nn.functional.cross_entropy(logits, on_object[:, k], ignore_index=-1)
            loss = loss + args.align_weight * align / 2
        loss.backward()
        for part in clipped:  # apart, so that the language model's gradients do not shrink the tower's
            torch.nn.utils.clip_grad_norm_(part, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        answers = answered if answers is None else 0.95 * answers + 0.05 * answered
        if step % 50 == 0 or step == args.steps - 1:
            lr, seconds = opt.param_groups[0]["lr"], time.perf_counter() - started
            early_part = f"  early {early_running:.4f}" if early_running is not None else ""
            early_part += f"  found {found_running:.3f}" if found_running is not None else ""
            left = eta(seconds - tower_seconds, step + 1, args.steps)
            say(
                f"step {step:5d}  loss {running:.4f}  answers {answers:.4f}{early_part}  lr {lr:.2e}  {seconds:6.0f} s"
                f"  (ETA {left})"
            )
        if args.eval_every and step and step % args.eval_every == 0 and step < args.steps - 1:
            probe = validate(val_rows[: min(len(val_rows), 250)])
            say(f"step {step:5d}  val[:250] " + "  ".join(f"{t} {probe['acc_' + t]:.3f}" for t in shapesqa.TYPES))
    train_s = time.perf_counter() - started
    for hook in hooks:
        hook.remove()
    if taps is not None:  # the saved model runs stock sdpa
        set_attention_implementation(model.config.text_config, "sdpa")

    metrics = validate(val_rows)
    val_root.cleanup()
    model.eval()
    metrics.update(train_seconds=round(train_s), steps=args.steps, batch=args.batch, seed=args.seed)
    say("val: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    say(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    say.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
