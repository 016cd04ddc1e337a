"""CacheView: evict, quantize and crop a KV cache while vtc's record of it stays true.

Every layer's cache is the concatenation of its chunks' slots (``vtc.engine.record``) and the dense
tokens after the last chunk. The view addresses tokens by the caller's columns (position in the
sequence of everything fed so far), which mean the same thing in every layer, so an eviction or a crop
is stated once and applied to each layer's own slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vtc import surface
from vtc.engine.record import RECORD_ATTR, CacheRecord, Chunk, Segment, plan_slots, record_of, segment_at
from vtc.state import VisualTokenState


@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """Keys or values quantized per token in groups of channels (asymmetric, round to nearest).

    Attributes:
        codes: ``[..., D]`` integer codes in ``0 .. 2**bits - 1`` (uint8).
        scale: ``[..., D / group, 1]`` step of each group.
        low: ``[..., D / group, 1]`` value of code 0 in each group.
        bits: bits per code.
        dtype: the dtype the values had.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    dtype: torch.dtype


def quantize(x: torch.Tensor, bits: int, group: int) -> QuantizedKV:
    """Quantize the last axis of `x` in groups of `group` channels: |x - dequantize(q)| <= scale / 2."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8 (codes are stored as uint8); got {bits}.")
    if group < 1 or x.shape[-1] % group:
        raise ValueError(f"group must divide the head dimension {x.shape[-1]}; got {group}.")
    grouped = x.float().unflatten(-1, (x.shape[-1] // group, group))  # [..., G, group]
    low = grouped.amin(-1, keepdim=True)
    scale = (grouped.amax(-1, keepdim=True) - low) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group codes as 0
    codes = ((grouped - low) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    return QuantizedKV(codes.flatten(-2), scale, low, bits, x.dtype)


def dequantize(q: QuantizedKV) -> torch.Tensor:
    codes = q.codes.unflatten(-1, (q.scale.shape[-2], -1)).float()  # [..., G, group]
    return (codes * q.scale + q.low).flatten(-2).to(q.dtype)


class CacheView:
    """A KV cache as the model's tokens: what each layer holds, and edits that keep the record true.

    Args:
        cache: the KV cache (a DynamicCache).
        num_layers: decoder layers of the model.
        last: the tokens of the forward that just wrote the cache, as they entered the backbone.
        last_column: the caller's column of that forward's first token.
    """

    def __init__(
        self, cache: Any, num_layers: int, *, last: VisualTokenState | None = None, last_column: int = 0
    ) -> None:
        self.cache = cache
        self.num_layers = num_layers
        self.last = last
        self.last_column = last_column

    def visual_columns(self) -> torch.Tensor:
        """``[B, columns]`` true at the visual tokens of the forward that just ran (a cache hook's candidates)."""
        if self.last is None:
            raise ValueError("this view was not made after a forward; it knows no visual tokens.")
        state = self.last
        out = torch.zeros(state.batch_size, self.columns, dtype=torch.bool, device=state.index.device)
        return out.index_copy(
            1, self.last_column + torch.arange(state.length, device=out.device), state.visual & state.valid
        )

    @property
    def record(self) -> CacheRecord | None:
        return record_of(self.cache)

    def slots(self, layer: int) -> int:
        """Cache slots of `layer` (vtc's padding slots included)."""
        return surface.cached_length(self.cache, layer)

    def dense_tail(self) -> int:
        """Tokens after the record's last chunk (every layer holds them)."""
        record, last = self.record, self.num_layers - 1
        return self.slots(last) - (record.recorded(last) if record is not None else 0)

    @property
    def columns(self) -> int:
        """The caller's columns the cache covers: everything fed so far."""
        record = self.record
        return (record.columns if record is not None else 0) + self.dense_tail()

    def columns_at(self, layer: int) -> torch.Tensor:
        """``[B, slots]`` the caller's column of each cache slot of `layer`; -1 for vtc's padding slots."""
        parts, batch = [], None
        for chunk in self._chunks():
            state = chunk.segment_at(layer).state
            batch = state.batch_size
            parts.append(torch.where(state.index >= 0, chunk.column + state.index, -1))
        return torch.cat(parts, dim=1) if parts else torch.zeros(batch or 0, 0, dtype=torch.long)

    def _chunks(self, materialize: bool = False) -> list[Chunk]:
        """The record's chunks plus the dense tail as a chunk (stored in the record with `materialize`)."""
        record = self.record
        chunks = list(record.chunks) if record is not None else []
        tail = self.dense_tail()
        if tail:
            keys, _ = surface.layer_kv(self.cache, self.num_layers - 1)
            start = record.columns if record is not None else 0
            chunks.append(Chunk.dense(start, tail, keys.shape[0], keys.device))
        if materialize:
            setattr(self.cache, RECORD_ATTR, CacheRecord(chunks))
        return chunks

    # -- evict -----------------------------------------------------------------------------------------
    def evict(self, drop: torch.Tensor, from_layer: int = 0) -> None:
        """Remove the tokens at the caller's columns `drop` from the caches of layers `from_layer`..

        Args:
            drop: ``[B, columns]`` true for the columns (tokens fed so far) to evict.
            from_layer: the first layer that loses them; earlier layers keep them.
        """
        if drop.shape[1] != self.columns:
            raise ValueError(f"drop has {drop.shape[1]} columns; the cache covers {self.columns}.")
        chunks = self._chunks(materialize=True)
        for j in range(from_layer, self.num_layers):
            keys, values = surface.layer_kv(self.cache, j)
            new_k, new_v, offset = [], [], 0
            for chunk in chunks:
                state = chunk.segment_at(j).state
                n = state.length
                slots, filled = self._kept_slots(chunk, state, drop)
                idx = slots.clamp(min=0)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
                f = filled[:, None, :, None].to(keys.dtype)  # [B, 1, n', 1]
                new_k.append(keys[:, :, offset : offset + n].gather(2, idx) * f)
                new_v.append(values[:, :, offset : offset + n].gather(2, idx) * f)
                offset += n
            surface.set_layer_kv(self.cache, j, torch.cat(new_k, dim=2), torch.cat(new_v, dim=2))
        for chunk in chunks:
            chunk.segments = self._split(chunk, drop, from_layer)

    @staticmethod
    def _kept_slots(chunk: Chunk, state: Any, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        columns = (chunk.column + state.index).clamp(min=0)  # [B, n]
        keep = (state.index >= 0) & ~drop.gather(1, columns)
        return plan_slots(keep)

    def _split(self, chunk: Chunk, drop: torch.Tensor, from_layer: int) -> list[Segment]:
        """The chunk's layer runs after evicting `drop` from layers `from_layer`.."""
        starts = sorted({s.start for s in chunk.segments} | {from_layer})
        out = []
        for start in starts:
            seg = segment_at(chunk.segments, start)
            if start < from_layer:
                out.append(seg if seg.start == start else dataclasses.replace(seg, start=start))
                continue
            slots, filled = self._kept_slots(chunk, seg.state, drop)
            state = seg.state.gather(slots, filled)
            kept = Segment(start, state, compacted=True, next_fresh=seg.next_fresh, renumbered=seg.renumbered)
            kept.shift = seg.shift
            out.append(kept)
        return out

    # -- quantize ----------------------------------------------------------------------------------------
    def quantize(self, layers: range | list[int], bits: int, group: int) -> dict[int, tuple[QuantizedKV, ...]]:
        """Quantize the keys and values of `layers` (every slot), returning what ``dequantize`` restores."""
        out = {}
        for j in layers:
            keys, values = surface.layer_kv(self.cache, j)
            out[j] = (quantize(keys, bits, group), quantize(values, bits, group))
        return out

    def dequantize(self, quantized: dict[int, tuple[QuantizedKV, ...]]) -> None:
        """Write dequantized keys and values back into their layers."""
        for j, (k, v) in quantized.items():
            keys, _ = surface.layer_kv(self.cache, j)
            if k.codes.shape != keys.shape:
                raise ValueError(f"layer {j} holds {tuple(keys.shape)} now; these codes are {tuple(k.codes.shape)}.")
            surface.set_layer_kv(self.cache, j, dequantize(k), dequantize(v))

    # -- crop --------------------------------------------------------------------------------------------
    def crop(self, columns: int) -> None:
        """Keep the first `columns` tokens fed (e.g. undo a rejected speculative step) in every layer."""
        if not 0 <= columns <= self.columns:
            raise ValueError(f"columns must be 0..{self.columns}; got {columns}.")
        record = self.record
        kept: list[Chunk] = []
        for chunk in record.chunks if record is not None else []:
            if chunk.column + chunk.length <= columns:
                kept.append(chunk)
            elif chunk.column < columns:
                raise ValueError(
                    f"cropping to {columns} would cut a pruned forward's tokens (columns {chunk.column}.."
                    f"{chunk.column + chunk.length}); crop at a forward's boundary."
                )
        recorded_columns = kept[-1].column + kept[-1].length if kept else 0
        tail = columns - recorded_columns
        for j in range(self.num_layers):
            length = sum(c.cached(j) for c in kept) + tail
            keys, values = surface.layer_kv(self.cache, j)
            surface.set_layer_kv(self.cache, j, keys[:, :, :length], values[:, :, :length])
        if record is not None:
            if kept:
                record.chunks = kept
            else:
                delattr(self.cache, RECORD_ATTR)
