"""CacheView: evict, quantize and crop a KV cache while vtc's record of it stays true.

``CacheView.pack`` keeps a layer's tokens in mixed precision for real: the cache then holds the packed
codes (``MixedKV``, made by the ``vtc.kernels.kv_quantize`` kernel) and dequantizes them when attention
reads the layer. ``quantize`` / ``dequantize`` below only simulate quantization (dense values written back).

Every layer's cache is the concatenation of its chunks' slots (``vtc.engine.record``) and the dense
tokens after the last chunk. The view addresses tokens by the caller's columns (position in the
sequence of everything fed so far), which mean the same thing in every layer, so an eviction or a crop
is stated once and applied to each layer's own slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vtc import kernels, surface
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


#: A precision at which tokens are kept as they are (not quantized).
FULL_BITS = 16


@dataclasses.dataclass(frozen=True)
class MixedKV:
    """Keys or values ``[B, H, L, D]`` of one layer, each token kept at one of two precisions.

    Tokens where `high` is true are stored at the first precision, the others at the second; each set
    is a list of whole tokens ``[N, H, D]`` quantized group-wise along ``D`` by ``vtc.kernels.kv_quantize``
    (or kept as they are at ``FULL_BITS``), so rows of a batch may keep different counts at each precision.

    Attributes:
        high: ``[B, L]`` bool, the tokens at the first precision.
        parts: the tokens at the first and at the second precision, in row-major order of `high`: a
            ``QuantizedKV`` of ``[N, H, D]``, a tensor ``[N, H, D]`` (full precision), or None (no token).
        shape: ``(B, H, L, D)``.
        dtype: the values' dtype.
    """

    high: torch.Tensor
    parts: tuple[Any, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def pack(cls, x: torch.Tensor, high: torch.Tensor, bits: tuple[int, int], group: int) -> MixedKV:
        """Quantize `x` ``[B, H, L, D]``: tokens where `high` ``[B, L]`` holds at ``bits[0]``, others at ``bits[1]``."""
        tokens = x.transpose(1, 2)  # [B, L, H, D]
        parts = []
        for chosen, b in ((high, bits[0]), (~high, bits[1])):
            picked = tokens[chosen]  # [N, H, D]
            if not picked.shape[0]:
                parts.append(None)
            elif b >= FULL_BITS:
                parts.append(picked.contiguous())
            else:
                parts.append(kernels.kv_quantize(picked, b, group))
        return cls(high.clone(), (parts[0], parts[1]), tuple(x.shape), x.dtype)

    @property
    def length(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and zero points (or full values), and the precision map."""
        held = self.high.numel() * self.high.element_size()
        for part in self.parts:
            if isinstance(part, torch.Tensor):
                held += part.numel() * part.element_size()
            elif part is not None:
                held += part.nbytes
        return held

    def unpack(self) -> torch.Tensor:
        """The ``[B, H, L, D]`` values the codes stand for (``vtc.kernels.kv_dequantize``)."""
        batch, heads, length, dim = self.shape
        out = torch.zeros(batch, length, heads, dim, dtype=self.dtype, device=self.high.device)
        for chosen, part in ((self.high, self.parts[0]), (~self.high, self.parts[1])):
            if part is not None:
                out[chosen] = part if isinstance(part, torch.Tensor) else kernels.kv_dequantize(part)
        return out.transpose(1, 2)


def kv_nbytes(cache: Any) -> int:
    """Bytes a KV cache holds for keys and values over all layers (packed layers count their packed bytes)."""
    return sum(surface.layer_nbytes(cache, j) for j in range(surface.num_cache_layers(cache)))


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
    def evict(self, drop: torch.Tensor, from_layer: int = 0, to_layer: int | None = None) -> None:
        """Remove the tokens at the caller's columns `drop` from the caches of layers `from_layer`..`to_layer` - 1.

        Args:
            drop: ``[B, columns]`` true for the columns (tokens fed so far) to evict.
            from_layer: the first layer that loses them; earlier layers keep them.
            to_layer: the first layer after them that keeps them again (None: none does), so that each
                layer can lose its own tokens (ZipVL's evict mode).
        """
        if drop.shape[1] != self.columns:
            raise ValueError(f"drop has {drop.shape[1]} columns; the cache covers {self.columns}.")
        to_layer = self.num_layers if to_layer is None else to_layer
        if not 0 <= from_layer < to_layer <= self.num_layers:
            raise ValueError(
                f"evict needs 0 <= from_layer < to_layer <= {self.num_layers}; got {from_layer}..{to_layer}."
            )
        chunks = self._chunks(materialize=True)
        for j in range(from_layer, to_layer):
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
            chunk.segments = self._split(chunk, drop, from_layer, to_layer)

    @staticmethod
    def _kept_slots(chunk: Chunk, state: Any, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        columns = (chunk.column + state.index).clamp(min=0)  # [B, n]
        keep = (state.index >= 0) & ~drop.gather(1, columns)
        return plan_slots(keep)

    def _split(self, chunk: Chunk, drop: torch.Tensor, from_layer: int, to_layer: int) -> list[Segment]:
        """The chunk's layer runs after evicting `drop` from layers `from_layer`..`to_layer` - 1."""
        starts = sorted({s.start for s in chunk.segments} | {from_layer} | ({to_layer} - {self.num_layers}))
        out = []
        for start in starts:
            seg = segment_at(chunk.segments, start)
            if start < from_layer or start >= to_layer:
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

    def pack(self, layer: int, high: torch.Tensor, bits: tuple[int, int], group: int) -> None:
        """Keep every slot of `layer` in mixed precision: `high` ``[B, slots]`` at ``bits[0]``, the rest at ``bits[1]``.

        The layer then holds the packed codes (``MixedKV``) and dequantizes them whenever attention reads
        it; tokens added later stay dense until ``pack_dense`` packs them. Slots and the record are unchanged.
        """
        keys, values = surface.layer_kv(self.cache, layer)
        if high.shape != keys.shape[:1] + keys.shape[2:3]:
            held = tuple(keys.shape[:1] + keys.shape[2:3])
            raise ValueError(f"high is {tuple(high.shape)}; layer {layer} holds {held} (batch, slots).")
        surface.pack_layer(
            self.cache, layer, [MixedKV.pack(keys, high, bits, group)], [MixedKV.pack(values, high, bits, group)]
        )

    def dense_run(self, layer: int) -> int:
        """Tokens at the end of `layer` held dense (all of them for a layer never packed)."""
        keys, _ = surface.layer_parts(self.cache, layer)
        last = keys[-1] if keys else None
        return last.shape[2] if isinstance(last, torch.Tensor) and last.dim() == 4 else 0

    def pack_dense(self, layer: int, bits: int, group: int) -> None:
        """Pack the dense tokens at the end of `layer` at `bits` (decoded tokens, after ``pack``)."""
        if not self.dense_run(layer):
            return
        keys, values = surface.layer_parts(self.cache, layer)
        runs = []
        for parts in (keys, values):
            tail = parts[-1]
            high = torch.ones(tail.shape[0], tail.shape[2], dtype=torch.bool, device=tail.device)
            runs.append([*parts[:-1], MixedKV.pack(tail, high, (bits, bits), group)])
        surface.pack_layer(self.cache, layer, *runs)

    def nbytes(self) -> int:
        """Bytes the cache holds for keys and values (``kv_nbytes``)."""
        return kv_nbytes(self.cache)

    # -- holes ---------------------------------------------------------------------------------------------
    def pack_tail(self, valid: torch.Tensor) -> torch.Tensor:
        """Squeeze the holes out of the last ``valid.shape[1]`` columns (all in the dense tail).

        A batch whose rows advance at their own pace leaves masked columns (holes) at different places in
        different rows. Each row's valid entries among those columns move to the right end in their order
        (keys keep their rotary positions, so attention under the new mask is unchanged), and the columns
        then empty in every row are dropped from every layer.

        Args:
            valid: ``[B, T]`` bool, the caller's mask over the last T columns.

        Returns:
            ``[B, T']`` the mask over the packed columns (T' = the most valid entries of any row).
        """
        tail = valid.shape[1]
        if tail > self.dense_tail():
            raise ValueError(
                f"only the {self.dense_tail()} columns after the last pruned forward can be packed; got {tail}."
            )
        count = valid.sum(1)  # [B]
        width = int(count.max()) if tail else 0
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, tail - width :]  # [B, width] holes first
        for j in range(self.num_layers):
            keys, values = surface.layer_kv(self.cache, j)
            base = keys.shape[2] - tail
            index = (base + order)[:, None, :, None]  # [B, 1, width, 1]
            keys = torch.cat([keys[:, :, :base], keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]))], 2)
            values = torch.cat(
                [values[:, :, :base], values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[3]))], 2
            )
            surface.set_layer_kv(self.cache, j, keys, values)
        return torch.arange(width, device=valid.device)[None, :] >= width - count[:, None]

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
