"""Draft models for speculative decoding: what proposes tokens for the target to verify.

- :class:`VisionDraft`: a smaller VLM of the target's family sharing its tokenizer; it sees the same
  prompt, images included. Wrap it with vtc first (``vtc.wrap(draft, "dart.r64")``) and its own
  session prunes its visual tokens (SpecVLM's recipe) while the target's stays as it is.
- :class:`TextDraft`: a text-only causal LM with the target's tokenizer; it sees the prompt with the
  image placeholders left out.
- :class:`HeadDraft`: a trained :class:`~vtc.methods.draft_head.DraftHead` (MSD / EAGLE style), one
  decoder layer over the target's own last hidden states and input embeddings (images included).

A draft keeps its own KV cache. Per round it feeds the tokens it has not seen (the token the target
emitted last, and a drafted token the target kept but the draft never fed), drafts ``k`` tokens, and is
cropped back to what the target kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vtc import surface
from vtc.adapters import adapter_for
from vtc.engine.cache import CacheView
from vtc.errors import MethodConflictError, UnsupportedModelError
from vtc.methods.draft_head import DraftHead


def following(positions: torch.Tensor) -> torch.Tensor:
    """``[B]`` the position after each row's last one, from ``[B, L]`` or M-RoPE's ``[3, B, L]`` positions."""
    return positions.reshape(-1, *positions.shape[-2:]).amax(dim=(0, 2)) + 1


def continuing(start: torch.Tensor, n: int, lead: torch.Size, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of `n` text tokens from ``start`` ``[B]`` on, in the layout (``lead`` = leading dims,
    ``()`` or ``(3,)``) of the prompt's positions: text numbers every M-RoPE row alike.

    With `valid` ``[B, n]`` (a ragged feed, real tokens right-aligned), only the real tokens count; a
    masked slot takes the position of the real token after it (no token attends to it).
    """
    if valid is None:
        positions = start[:, None] + torch.arange(n, device=start.device)
    else:
        positions = start[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
    return positions.expand(*lead, *positions.shape)


def right_aligned(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [B, n, ...], valid [B, n])`` from per-row tensors of different lengths, each placed at the
    right end (the last column is every row's last real entry); the slots before are zeros, not valid."""
    width = max(len(r) for r in rows)
    first = rows[0]
    values = first.new_zeros(len(rows), width, *first.shape[1:])
    valid = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
    for b, row in enumerate(rows):
        if len(row):
            values[b, width - len(row) :] = row
            valid[b, width - len(row) :] = 1
    return values, valid


#: Pack a cache's holes away once every row holds at least this many after its prompt.
COMPACT_AT = 8


def pack_holes(view: CacheView, mask: torch.Tensor, start: int) -> torch.Tensor:
    """`mask` after packing the holes that the columns from `start` on hold (``CacheView.pack_tail``), once
    every row holds at least ``COMPACT_AT`` of them; otherwise `mask` as it is."""
    tail = mask[:, start:].bool()
    holes = (~tail).sum(1)
    if not tail.shape[1] or int(holes.min()) < COMPACT_AT or tail.shape[1] > view.dense_tail():
        return mask
    return torch.cat([mask[:, :start], view.pack_tail(tail).to(mask.dtype)], dim=1)


def hide_tail(view: CacheView, mask: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the last ``drop[b]`` columns of each row: the columns no row keeps are cropped from the cache,
    the rest become holes (zeros of the 2-D mask, which every later forward passes).

    Returns:
        ``(mask, cropped)``: the new mask, and the columns cropped (the same for every row).
    """
    common = int(drop.min()) if drop.numel() else 0
    if common:
        view.crop(view.columns - common)
        mask = mask[:, :-common]
    holes = drop - common
    if bool((holes > 0).any()):
        columns = torch.arange(mask.shape[1], device=mask.device)
        mask = mask.masked_fill(columns[None, :] >= mask.shape[1] - holes[:, None], 0)
    return mask, common


def vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings; a draft must be a causal LM or a VLM.")
    return int(head.weight.shape[0])


def make_draft(draft: nn.Module, target: Any) -> Draft:
    """The draft wrapper for `draft` against the bound target adapter `target`; clear errors for a draft
    the target cannot verify."""
    if isinstance(draft, DraftHead):
        return HeadDraft(check_head(draft, target), target)
    if draft is target.model:
        raise ValueError(
            "specdec: the draft is the target model itself; pass a separate model (a smaller one of the same "
            "family, a text-only LM with the same tokenizer, or copy.deepcopy(model) to check the loop)."
        )
    if not isinstance(draft, nn.Module) or not hasattr(draft, "get_output_embeddings"):
        raise TypeError(f"specdec: draft must be a transformers model; got {type(draft).__name__}.")
    want, got = vocabulary_size(target.model), vocabulary_size(draft)
    if got != want:
        raise ValueError(
            f"specdec: the draft's vocabulary has {got} tokens and the target's {want}; speculative decoding "
            "needs a draft with the target's tokenizer."
        )
    if getattr(draft.config, "vision_config", None) is None:
        return TextDraft(draft, target)
    try:
        adapter = adapter_for(draft)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"specdec: the draft is a VLM vtc does not support: {exc}") from None
    family = type(getattr(target, "_adapter", target))
    if type(adapter) is not family:
        raise ValueError(
            f"specdec: the draft is a {adapter.name} model and the target a {family.name} one; a VLM draft "
            "must be of the target's family (sharing its tokenizer and image placeholders)."
        )
    return VisionDraft(draft, target)


def check_head(head: DraftHead, target: Any) -> DraftHead:
    """`head` if it can read the target's hidden states and speak through its LM head; else a clear error."""
    width, vocab = int(target.text_config.hidden_size), vocabulary_size(target.model)
    fix = (
        "a head reads the target's last hidden states and uses its LM head: build one for this target "
        "(DraftHead.for_target(model), then train it) or load a head trained on this target"
    )
    if head.hidden_size != width:
        raise ValueError(
            f"specdec: the draft head is {head.hidden_size} wide and the target's language model {width}; {fix}."
        )
    if head.vocab_size != vocab:
        raise ValueError(
            f"specdec: the draft head was built for a vocabulary of {head.vocab_size} tokens and the target has "
            f"{vocab}; {fix}."
        )
    return head


class Draft:
    """A draft model's prompt, cache and position bookkeeping (subclasses choose what it sees)."""

    def __init__(self, model: nn.Module, target: Any) -> None:
        self.model = model
        self.target = target
        self.extra: Callable[[torch.Tensor], dict[str, torch.Tensor]] = lambda ids: {}

    def open(self) -> None:
        """Called before the target's prefill (a draft that reads the target installs its hooks here)."""

    def close(self) -> None:
        """Called when the generate call ends, however it ends."""

    def prompt(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """The draft's own prompt arguments and their positions."""
        raise NotImplementedError

    @torch.no_grad()
    def start(self, inputs: dict[str, Any], pending: torch.Tensor) -> None:
        """Prefill the prompt; `pending` (the target's first token) is the first token to feed."""
        prompt, positions = self.prompt(inputs)
        out = self.model(**prompt, position_ids=positions, use_cache=True)
        self.cache = surface.output_cache(out)
        self.view = CacheView(self.cache, surface.num_cache_layers(self.cache))
        self.mask = prompt["attention_mask"]
        self.prompt_width = self.mask.shape[1]
        self.lead = positions.shape[:-2]  # () for [B, L] positions, (3,) for M-RoPE
        self.next = following(positions)
        self.unfed, self.unfed_valid = pending, torch.ones_like(pending)

    def _feed(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run `tokens` ``[B, n]`` through the draft (`valid`: which are real, right-aligned); the logits of
        the last one."""
        valid = torch.ones_like(tokens) if valid is None else valid
        positions = continuing(self.next, tokens.shape[1], self.lead, valid)
        self.mask = torch.cat([self.mask, valid.to(self.mask.dtype)], dim=1)
        out = self.model(
            input_ids=tokens, attention_mask=self.mask, position_ids=positions,
            **self.extra(tokens), **surface.cache_kwargs(self.model, self.cache),
        )  # fmt: skip
        self.next = self.next + valid.sum(1)
        return out.logits[:, -1]

    @torch.no_grad()
    def propose(self, k: int, choose: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]):
        """``k`` tokens ``[B, k]`` and the distributions they were chosen from ``[B, k, V]``.

        `choose(logits, i)` returns ``(tokens [B], probabilities [B, V])`` for the i-th drafted token.
        """
        if k == 0:
            return self.unfed[:, :0], None
        tokens, probs = [], []
        feed, valid = self.unfed, self.unfed_valid
        for i in range(k):
            token, prob = choose(self._feed(feed, valid), i)
            tokens.append(token[:, None])
            probs.append(prob)
            feed, valid = token[:, None], None
        self.fed_drafts = k - 1
        self.unfed, self.unfed_valid = feed[:, :0], self.unfed_valid[:, :0]
        return torch.cat(tokens, dim=1), torch.stack(probs, dim=1)

    def commit(self, kept: torch.Tensor, drafted: torch.Tensor, emitted: torch.Tensor, k: int) -> None:
        """Row b of the target kept ``drafted[b, :kept[b]]`` and then emitted ``emitted[b]`` (`emitted`
        ``[B, 1]``): undo the rejected drafts in the draft's cache (cropped where no row keeps them, masked
        out where some row does) and queue per row what it has not fed."""
        if k == 0:  # nothing was fed this round
            self.unfed = torch.cat([self.unfed, emitted], dim=1)
            self.unfed_valid = torch.cat([self.unfed_valid, torch.ones_like(emitted)], dim=1)
            return
        seen = kept.clamp(max=self.fed_drafts)  # [B] drafted tokens both kept and already in the draft's cache
        drop = self.fed_drafts - seen
        self.mask, _ = hide_tail(self.view, self.mask, drop)
        self.mask = pack_holes(self.view, self.mask, self.prompt_width)
        self.next = self.next - drop
        rows = [torch.cat([drafted[b, int(seen[b]) : int(kept[b])], emitted[b]]) for b in range(len(kept))]
        self.unfed, self.unfed_valid = right_aligned(rows)


class VisionDraft(Draft):
    """A VLM of the target's family: the same prompt, images and all."""

    def __init__(self, model: nn.Module, target: Any) -> None:
        super().__init__(model, target)
        self.adapter = adapter_for(model)
        self.extra = self.adapter.text_inputs

    def prompt(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        dtype = next(self.model.parameters()).dtype
        prompt = {k: v.to(dtype) if k.startswith("pixel_values") else v for k, v in inputs.items()}
        return prompt, self.adapter.prompt_positions(prompt)


class TextDraft(Draft):
    """A text-only LM: the prompt without its visual placeholders, left-padded again."""

    def prompt(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        keep = mask.bool() & ~self.target.visual_mask(ids, None)
        rows = [row[k] for row, k in zip(ids, keep, strict=True)]
        width = max(1, max(len(r) for r in rows))
        pad = self.model.config.pad_token_id
        pad = 0 if pad is None else pad
        out_ids = torch.full((len(rows), width), pad, dtype=ids.dtype, device=ids.device)
        out_mask = torch.zeros(len(rows), width, dtype=mask.dtype, device=ids.device)
        for b, row in enumerate(rows):
            if len(row):
                out_ids[b, width - len(row) :] = row
                out_mask[b, width - len(row) :] = 1
        positions = (out_mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": out_ids, "attention_mask": out_mask}, positions


class HeadDraft(Draft):
    """A :class:`~vtc.methods.draft_head.DraftHead`: drafts from the target's own hidden states.

    Hooks on the target's language model (installed by :meth:`open`, removed by :meth:`close`) keep the
    input embeddings and the last hidden states (after the final norm) of the target's last forward. The
    head's cache holds one entry per position the target has verified, each made from the target's true
    hidden state: in a round, the first draft is read from the head's output at the last verified
    position, the next ones from the head fed its own estimate; after the verify the entries made from
    estimates are cropped and the verified positions fed again with the target's states (EAGLE's
    bookkeeping).
    """

    def __init__(self, head: DraftHead, target: Any) -> None:
        super().__init__(head, target)
        self.embedding = target.model.get_input_embeddings()
        self.lm_head = target.lm_head
        self.hooks: list[Any] = []
        self.embeds: torch.Tensor | None = None
        self.features: torch.Tensor | None = None

    def open(self) -> None:
        pruning = [m.name for m in getattr(self.target, "methods", ()) if getattr(m, "prunes", False)]
        if pruning:
            raise MethodConflictError(
                f"specdec: a draft head reads the target's hidden state at every prompt position, which "
                f"{', '.join(pruning)} removes; use the head without pruning on the target, or another draft."
            )

        def embedded(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.embeds = kwargs.get("inputs_embeds")

        def normed(module: nn.Module, args: tuple, output: Any) -> None:
            # The language model's output, not a hook on its final norm: an output hook such as DeCo's runs
            # the final norm again over early layers' states after the forward.
            self.features = surface.last_hidden_state(output)

        self.hooks = [
            self.target.text_model.register_forward_pre_hook(embedded, with_kwargs=True),
            self.target.text_model.register_forward_hook(normed),
        ]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.embeds, self.features = [], None, None

    def logits(self, estimate: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` the target's LM head over the head's estimate ``[B, d]``."""
        return self.lm_head(estimate.to(self.lm_head.weight.dtype))

    @torch.no_grad()
    def start(self, inputs: dict[str, Any], pending: torch.Tensor) -> None:
        """Feed the prompt's pairs ``(h_t, e_{t+1})``, the last with `pending`'s embedding."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        features, embeds = self.features, self.embeds
        if features is None or embeds is None or features.shape[1] != ids.shape[1] or embeds.shape[1] != ids.shape[1]:
            raise ValueError(
                "specdec: the draft head needs the target's hidden state at every prompt position, but the "
                "target's prefill did not yield one per input token; run the target without methods that "
                "change its sequence."
            )
        positions = self.target.prompt_positions(inputs)
        following_embeds = torch.cat([embeds[:, 1:], self.embedding(pending).to(embeds.dtype)], dim=1)
        estimates, self.cache = self.model(features, following_embeds, mask, positions)
        self.view = CacheView(self.cache, surface.num_cache_layers(self.cache))
        self.mask = mask
        self.prompt_width = mask.shape[1]
        self.lead = positions.shape[:-2]
        self.next = following(positions)
        self.last = estimates[:, -1]
        self.fed_drafts = 0

    def _feed_pairs(self, features: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None):
        """Feed pairs (`features` ``[B, n, d]``, embeddings of `tokens` ``[B, n]``; `valid`: which are real,
        right-aligned); the last estimate ``[B, d]``."""
        valid = torch.ones_like(tokens) if valid is None else valid
        positions = continuing(self.next, tokens.shape[1], self.lead, valid)
        self.mask = torch.cat([self.mask, valid.to(self.mask.dtype)], dim=1)
        estimates, self.cache = self.model(features, self.embedding(tokens), self.mask, positions, self.cache)
        self.next = self.next + valid.sum(1)
        return estimates[:, -1]

    @torch.no_grad()
    def propose(self, k: int, choose: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]):
        self.fed_drafts = max(0, k - 1)
        if k == 0:
            return torch.zeros(self.last.shape[0], 0, dtype=torch.long, device=self.last.device), None
        tokens, probs = [], []
        estimate = self.last
        for i in range(k):
            token, prob = choose(self.logits(estimate), i)
            tokens.append(token[:, None])
            probs.append(prob)
            if i < k - 1:  # the target has no state here yet: the head feeds its own estimate
                estimate = self._feed_pairs(estimate[:, None], token[:, None])
        return torch.cat(tokens, dim=1), torch.stack(probs, dim=1)

    @torch.no_grad()
    def commit(self, kept: torch.Tensor, drafted: torch.Tensor, emitted: torch.Tensor, k: int) -> None:
        """Drop the entries made from estimates (every row fed the same number), then feed each row's
        verified positions with the target's states: pending and its ``kept[b]`` drafts, each paired with
        the token that followed it (rows of different lengths right-aligned, the slots before masked)."""
        if self.fed_drafts:
            self.view.crop(self.view.columns - self.fed_drafts)
            self.mask = self.mask[:, : -self.fed_drafts]
            self.next = self.next - self.fed_drafts
            self.fed_drafts = 0
        n = [int(x) + 1 for x in kept]  # the verify forward's states at pending, d_1 .. d_kept
        features, valid = right_aligned([self.features[b, : n[b]] for b in range(len(n))])
        tokens, _ = right_aligned([torch.cat([drafted[b, : n[b] - 1], emitted[b]]) for b in range(len(n))])
        self.last = self._feed_pairs(features, tokens, valid)
        self.mask = pack_holes(self.view, self.mask, self.prompt_width)
