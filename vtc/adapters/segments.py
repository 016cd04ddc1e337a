"""Segments: runs of decoder layers that see the same tokens, and how vtc keeps them consistent.

The text backbone computes the attention mask and the rotary embeddings once per forward, for its
full input. After a pruning stage at layer i, layers i.. see fewer tokens, so vtc hands them their own
arguments: the hidden states gathered to the kept tokens, rotary embeddings for those tokens, and a
mask built by transformers' own mask functions from that layer's KV cache (which holds fewer tokens
than the caches of earlier layers). A pruned prefill leaves a ``CacheRecord`` on its cache, from which
later forwards (decode steps) rebuild each segment's mask and, for renumbered segments, positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vtc.state import VisualTokenState


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., b, index[b], :]`` for ``x`` of shape ``[..., B or 1, L, d]`` and ``index`` ``[B, L']``."""
    batch, width = index.shape
    x = x.expand(*x.shape[:-3], batch, *x.shape[-2:])
    idx = index.clamp(min=0)[..., None].expand(batch, width, x.shape[-1])  # [B, L', d]
    return x.gather(-2, idx.expand(*x.shape[:-3], batch, width, x.shape[-1]))


def plan_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the compacted sequence: kept positions in order, rows left-padded to one length.

    Args:
        keep: ``[B, L]`` true for slots to keep.

    Returns:
        ``slots [B, L']`` indices into the current sequence and ``filled [B, L']`` (false for padding),
        with ``L'`` the largest kept count. Padding goes on the left so the last slot stays the last token.
    """
    length = keep.shape[1]
    width = int(keep.sum(dim=1).max().item())
    pos = torch.arange(length, device=keep.device)
    ordered = torch.where(keep, pos, -1).sort(dim=1).values  # dropped (-1) first, then kept ascending
    slots = ordered[:, length - width :]
    return slots, slots >= 0


def fresh_positions(valid: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions 0..n-1 over each row's valid tokens, as generate numbers a left-padded input."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


@dataclasses.dataclass
class Segment:
    """A run of decoder layers that all see (and cache) the same token set.

    Attributes:
        start: the first decoder layer of the run.
        state: the tokens those layers see, relative to the prefill's input (None: not known).
        compacted: the layers see other tokens or positions than the backbone computed for.
        cos_sin: rotary ``(cos, sin)`` of the current forward for these layers.
        next_fresh: for renumbered segments, ``[B]`` the position the first token after the prompt takes.
        shift: for renumbered segments, original minus fresh position of generated tokens (set at the first
            forward after the prefill, from the positions the caller passed).
        masks: layer type -> attention mask of the current forward.
    """

    start: int
    state: VisualTokenState | None
    compacted: bool = False
    cos_sin: tuple[torch.Tensor, ...] | None = None
    next_fresh: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    masks: dict[str, Any] = dataclasses.field(default_factory=dict)

    def reset_forward(self) -> None:
        """Drop what belongs to one forward (masks, rotary embeddings); keep what describes the cache."""
        self.masks = {}
        self.cos_sin = None


@dataclasses.dataclass
class CacheRecord:
    """What a pruned prefill left in a KV cache: the prompt length and the segments."""

    prompt_len: int
    segments: list[Segment]


@dataclasses.dataclass
class Forward:
    """Bookkeeping of the text-backbone forward in progress.

    Attributes:
        prefill: the cache was empty (stages run) or not (segments are replayed).
        state: the current tokens during a prefill.
        cache: the KV cache object, or None.
        segments: the layer runs, in order.
        user_mask: the 2-D attention mask the caller passed (None when all ones).
        positions: the caller's position ids of this forward (``[B, q]`` or ``[rows, B, q]``).
        prompt_len: the prefill's input length.
        boundaries: ``(layer, tokens per row, visual per row, tensor length)`` where the token set changed.
    """

    prefill: bool
    state: VisualTokenState | None
    cache: Any
    segments: list[Segment]
    user_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    prompt_len: int = 0
    boundaries: list[tuple[int, list[int], list[int], int]] = dataclasses.field(default_factory=list)

    def segment_at(self, layer: int) -> Segment:
        return [s for s in self.segments if s.start <= layer][-1]


def boundary(layer: int, state: VisualTokenState) -> tuple[int, list[int], list[int], int]:
    return layer, state.num_tokens().tolist(), state.num_visual().tolist(), state.length
