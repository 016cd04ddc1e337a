"""Segments, chunks and the cache record: which tokens each decoder layer sees and caches.

The text backbone computes the attention mask and the rotary embeddings once per forward, for its
full input. After a pruning stage at layer i, layers i.. see fewer tokens, so vtc hands them their own
arguments: the hidden states gathered to the kept tokens, rotary embeddings for those tokens, and a
mask built by transformers' own mask functions from that layer's KV cache (which holds fewer tokens
than the caches of earlier layers).

A forward whose tokens were pruned leaves a ``Chunk`` in the ``CacheRecord`` on its cache: for each run
of layers (a ``Segment``), which of the forward's input tokens those layers cached. The record is an
append-only list of chunks; tokens cached after the last recorded chunk (decode steps, unpruned
extends) are dense and need no entry, since every layer holds all of them. Later forwards rebuild each
layer's mask from the record.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

from vtc.state import VisualTokenState

# The attribute a pruned cache's record lives in, on the KV cache object (copies of the cache keep it).
RECORD_ATTR = "_vtc_record"


class ForwardKind(enum.Enum):
    """What a forward of the text backbone does to its KV cache."""

    PREFILL = "prefill"  # the cache is empty (or there is none): the whole prompt
    EXTEND = "extend"  # several new tokens over a non-empty cache: a chat turn, streamed frames, a verify step
    DECODE = "decode"  # one new token over a non-empty cache


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
    """A run of decoder layers that all see (and cache) the same tokens of one forward.

    Attributes:
        start: the first decoder layer of the run.
        state: those tokens, relative to the forward's input.
        compacted: the layers see other tokens or positions than the backbone computed for.
        cos_sin: rotary ``(cos, sin)`` of the current forward's tokens for these layers.
        next_fresh: for renumbered segments, ``[B]`` the position the first token after the prompt takes.
        renumbered: for renumbered segments, ``[B]`` the rows a stage renumbered (rows that lost no token
            keep their original positions, as they would alone, where no stage runs at all).
        shift: for renumbered segments, original minus fresh position of later tokens (set at the first
            forward after the prefill, from the positions the caller passed; 0 in rows not renumbered).
    """

    start: int
    state: VisualTokenState
    compacted: bool = False
    cos_sin: tuple[torch.Tensor, ...] | None = None
    next_fresh: torch.Tensor | None = None
    renumbered: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def reset_forward(self) -> None:
        """Drop what belongs to one forward (its rotary embeddings); keep what describes the cache."""
        self.cos_sin = None


def segment_at(segments: list[Segment], layer: int) -> Segment:
    return [s for s in segments if s.start <= layer][-1]


@dataclasses.dataclass
class Chunk:
    """The tokens one forward left in the KV cache.

    Attributes:
        column: the caller's attention-mask column of the forward's first input token.
        length: input tokens of the forward.
        segments: layer runs, the first starting at layer 0; each says which input tokens its layers cached.
    """

    column: int
    length: int
    segments: list[Segment]

    @classmethod
    def dense(cls, column: int, length: int, batch: int, device: torch.device) -> Chunk:
        """Tokens every layer cached: decode steps and unpruned forwards before a pruned one."""
        visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        return cls(column, length, [Segment(0, VisualTokenState.initial(visual, ~visual))])

    def segment_at(self, layer: int) -> Segment:
        return segment_at(self.segments, layer)

    def cached(self, layer: int) -> int:
        """Cache slots of this chunk in layer `layer` (vtc's padding slots included)."""
        return self.segment_at(layer).state.length

    def valid_at(self, layer: int, user_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, cached]`` which of the chunk's cache slots in `layer` may be attended.

        A slot is attendable when it holds a token (not vtc's padding) the caller's 2-D mask does not hide.
        """
        state = self.segment_at(layer).state
        if user_mask is None:
            return state.valid
        columns = (self.column + state.index.clamp(min=0)).clamp(max=user_mask.shape[1] - 1)
        return state.valid & user_mask.bool().gather(1, columns)


@dataclasses.dataclass
class CacheRecord:
    """What pruned forwards left in a KV cache, chunk by chunk, oldest first.

    Tokens after the last chunk are dense: every layer cached all of them, in order.
    """

    chunks: list[Chunk]

    @property
    def columns(self) -> int:
        """Caller's mask columns the recorded chunks cover."""
        last = self.chunks[-1]
        return last.column + last.length

    def recorded(self, layer: int) -> int:
        return sum(c.cached(layer) for c in self.chunks)

    def compacted_at(self, layer: int) -> bool:
        return any(c.segment_at(layer).compacted for c in self.chunks)

    @property
    def prefill(self) -> Chunk:
        return self.chunks[0]

    def renumbered_at(self, layer: int) -> Segment | None:
        """The prefill's segment covering `layer` when it renumbered positions (later tokens shift)."""
        seg = self.prefill.segment_at(layer)
        return seg if seg.next_fresh is not None else None

    def reset_forward(self) -> None:
        for chunk in self.chunks:
            for seg in chunk.segments:
                seg.reset_forward()


def record_of(cache: Any) -> CacheRecord | None:
    """The record pruned forwards left on `cache`, or None."""
    return getattr(cache, RECORD_ATTR, None) if cache is not None else None


@dataclasses.dataclass
class Forward:
    """Bookkeeping of the text-backbone forward in progress.

    Attributes:
        kind: prefill, extend or decode.
        state: the forward's current tokens (gathered copies replace it as stages prune).
        cache: the KV cache object, or None.
        segments: the layer runs of this forward's tokens.
        record: the chunks earlier forwards left in the cache (None: the cache is dense).
        dense_before: cached tokens after the record's last chunk (all layers hold them), before this forward.
        user_mask: the 2-D attention mask the caller passed (None when all ones).
        positions: the caller's position ids of this forward (``[B, q]`` or ``[rows, B, q]``).
        boundaries: ``(layer, tokens per row, visual per row, tensor length)`` where the token set changed.
        masks: attention masks built in this forward, by layer type and the segments a layer sees.
        length: input tokens of the forward.
        input_state: the forward's tokens as they entered the backbone (before any stage).
        has_visual: the input carries visual tokens (extend stages act only then).
    """

    kind: ForwardKind
    state: VisualTokenState
    cache: Any
    segments: list[Segment]
    record: CacheRecord | None = None
    dense_before: int = 0
    user_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    boundaries: list[tuple[int, list[int], list[int], int]] = dataclasses.field(default_factory=list)
    masks: dict[tuple, Any] = dataclasses.field(default_factory=dict)
    length: int = dataclasses.field(init=False)
    has_visual: bool = dataclasses.field(init=False)
    input_state: VisualTokenState = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.input_state = self.state
        self.length = self.state.length
        self.has_visual = bool(self.state.visual.any())

    @property
    def prefill(self) -> bool:
        return self.kind is ForwardKind.PREFILL

    @property
    def column(self) -> int:
        """The caller's mask column of this forward's first token."""
        return (self.record.columns if self.record is not None else 0) + self.dense_before

    def segment_at(self, layer: int) -> Segment:
        return segment_at(self.segments, layer)

    def compacted(self) -> bool:
        return any(s.compacted for s in self.segments)


def boundary(layer: int, state: VisualTokenState) -> tuple[int, list[int], list[int], int]:
    return layer, state.num_tokens().tolist(), state.num_visual().tolist(), state.length
