"""Draft models for speculative decoding: what proposes tokens for the target to verify.

- :class:`VisionDraft`: a smaller VLM of the target's family sharing its tokenizer; it sees the same
  prompt, images included. Wrap it with vtc first (``vtc.wrap(draft, "dart.r64")``) and its own
  session prunes its visual tokens (SpecVLM's recipe) while the target's stays as it is.
- :class:`TextDraft`: a text-only causal LM with the target's tokenizer; it sees the prompt with the
  image placeholders left out.

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
from vtc.errors import UnsupportedModelError


def following(positions: torch.Tensor) -> torch.Tensor:
    """``[B]`` the position after each row's last one, from ``[B, L]`` or M-RoPE's ``[3, B, L]`` positions."""
    return positions.reshape(-1, *positions.shape[-2:]).amax(dim=(0, 2)) + 1


def continuing(start: torch.Tensor, n: int, lead: torch.Size) -> torch.Tensor:
    """Positions of `n` text tokens from ``start`` ``[B]`` on, in the layout (``lead`` = leading dims,
    ``()`` or ``(3,)``) of the prompt's positions: text numbers every M-RoPE row alike."""
    positions = start[:, None] + torch.arange(n, device=start.device)
    return positions.expand(*lead, *positions.shape)


def vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings; a draft must be a causal LM or a VLM.")
    return int(head.weight.shape[0])


def make_draft(draft: nn.Module, target: Any) -> Draft:
    """The draft wrapper for `draft` against the bound target adapter `target`; clear errors for a draft
    the target cannot verify."""
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


class Draft:
    """A draft model's prompt, cache and position bookkeeping (subclasses choose what it sees)."""

    def __init__(self, model: nn.Module, target: Any) -> None:
        self.model = model
        self.target = target
        self.extra: Callable[[torch.Tensor], dict[str, torch.Tensor]] = lambda ids: {}

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
        self.lead = positions.shape[:-2]  # () for [B, L] positions, (3,) for M-RoPE
        self.next = following(positions)
        self.unfed = pending

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run `tokens` ``[B, n]`` through the draft; the logits of the last one."""
        n = tokens.shape[1]
        positions = continuing(self.next, n, self.lead)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        out = self.model(
            input_ids=tokens, attention_mask=self.mask, position_ids=positions,
            **self.extra(tokens), **surface.cache_kwargs(self.model, self.cache),
        )  # fmt: skip
        self.next = self.next + n
        return out.logits[:, -1]

    @torch.no_grad()
    def propose(self, k: int, choose: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]):
        """``k`` tokens ``[B, k]`` and the distributions they were chosen from ``[B, k, V]``.

        `choose(logits, i)` returns ``(tokens [B], probabilities [B, V])`` for the i-th drafted token.
        """
        if k == 0:
            return self.unfed[:, :0], None
        tokens, probs = [], []
        feed = self.unfed
        for i in range(k):
            token, prob = choose(self._feed(feed), i)
            tokens.append(token[:, None])
            probs.append(prob)
            feed = token[:, None]
        self.fed_drafts = k - 1
        self.unfed = feed[:, :0]
        return torch.cat(tokens, dim=1), torch.stack(probs, dim=1)

    def commit(self, kept: int, drafted: torch.Tensor, emitted: torch.Tensor, k: int) -> None:
        """The target kept ``drafted[:, :kept]`` and then emitted `emitted` ``[B, 1]``: crop the draft's
        cache to what stays and queue what it has not fed."""
        if k == 0:  # nothing was fed this round
            self.unfed = torch.cat([self.unfed, emitted], dim=1)
            return
        seen = min(kept, self.fed_drafts)  # drafted tokens both kept and already in the draft's cache
        drop = self.fed_drafts - seen
        if drop:
            self.view.crop(self.view.columns - drop)
            self.mask = self.mask[:, :-drop]
            self.next = self.next - drop
        self.unfed = torch.cat([drafted[:, seen:kept], emitted], dim=1)


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
