"""Compaction: pruning stages between decoder layers, and the arguments compacted layers get.

After a stage at layer i keeps a subset of the tokens, layers i.. run on the gathered hidden states with
rotary embeddings taken at each kept token's position (original by default) and a mask built by
transformers' own mask functions over what each layer's KV cache holds: the chunks earlier forwards
left (see ``vtc.engine.record``), the dense tokens after them, and this forward's tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vtc import kernels, surface
from vtc.engine.record import (
    Forward,
    ForwardKind,
    Segment,
    boundary,
    fresh_positions,
    gather_tokens,
    plan_slots,
)
from vtc.method import LayerContext, Selection
from vtc.state import StageRecord, VisualTokenState

if TYPE_CHECKING:
    from vtc.engine.session import Session


def run_stages(session: Session, i: int, hidden: torch.Tensor, kwargs: dict, fwd: Forward) -> torch.Tensor:
    """Run the pruning stages at layer `i` on this forward's tokens and compact `hidden` to what they keep."""
    stages = session.pipeline.stages_at(i) if fwd.prefill else session.pipeline.extend_stages_at(i)
    for method in stages:
        state = fwd.state
        with kernels.record() as backends:
            sel = method.select(LayerContext(i, hidden, state, session.bound))
        session.stats.backends.update(backends)
        if sel is None:
            continue
        if not isinstance(sel, Selection):
            sel = Selection(sel)
        if sel.positions == "fresh" and not fwd.prefill:
            raise ValueError(f"{method.name} renumbers positions, which only a prefill can do; not an extend.")
        if sel.hidden is not None:
            hidden = sel.hidden
        present = state.index >= 0
        keep = sel.keep & present
        if sel.scope == "visual":  # only visual tokens (and vtc's own padding slots) can go
            keep |= ~state.visual & present
        visual_before = state.num_visual().tolist()
        if bool((keep != present).any()):
            hidden, state = compact(session, i, hidden, keep, sel.positions, kwargs, fwd)
        session.stats.stages.append(
            StageRecord(
                method.name,
                i,
                state.kept_visual(),
                state.kept_positions(),
                visual_before,
                state.kept_tokens(),
                kind=fwd.kind.value,
            )
        )
    return hidden


def source_cos_sin(session: Session, i: int, hidden: torch.Tensor, kwargs: dict, fwd: Forward) -> tuple:
    """Rotary embeddings of this forward's input tokens as layer `i` must see them, before any gather."""
    renumbered = fwd.record.renumbered_at(i) if fwd.record is not None else None
    if renumbered is None:
        return kwargs[surface.POSITION_EMBEDDINGS]
    if renumbered.cos_sin is None:  # this forward's tokens continue the prefill's fresh numbering
        if renumbered.shift is None:  # the first forward after the prefill fixes the offset per row
            offset = fwd.positions[..., :1] - renumbered.next_fresh[:, None]
            renumbered.shift = torch.where(renumbered.renumbered[:, None], offset, 0)
        renumbered.cos_sin = session.adapter.rotary(hidden, fwd.positions - renumbered.shift)
    return renumbered.cos_sin


def compact(
    session: Session, i: int, hidden: torch.Tensor, keep: torch.Tensor, positions: str, kwargs: dict, fwd: Forward
) -> tuple[torch.Tensor, VisualTokenState]:
    """Gather the kept slots; start a new segment at layer `i` with its rotary embeddings."""
    dropping = (keep != (fwd.state.index >= 0)).any(dim=1)  # [B] rows that lose a token here
    slots, filled = plan_slots(keep)
    current = fwd.segment_at(i)
    # Chained from the tokens' current embeddings: original positions stay original, and tokens an
    # earlier stage renumbered keep their new numbers.
    source = current.cos_sin if current.compacted else source_cos_sin(session, i, hidden, kwargs, fwd)
    hidden = gather_tokens(hidden, slots) * filled[..., None].to(hidden.dtype)
    state = fwd.state = fwd.state.gather(slots, filled)
    seg = Segment(i, state, compacted=True)
    chained = tuple(gather_tokens(t, slots) for t in source)
    seg.next_fresh, seg.renumbered = current.next_fresh, current.renumbered
    if positions == "fresh":
        # Only rows that lose tokens are renumbered: a row that keeps everything takes the positions it
        # would have alone, where the stage would not run (M-RoPE positions are not 0..n-1).
        fresh = session.adapter.rotary(hidden, fresh_positions(state.valid))
        seg.cos_sin = tuple(torch.where(dropping[:, None, None], f, c) for f, c in zip(fresh, chained, strict=True))
        seg.renumbered = dropping if seg.renumbered is None else seg.renumbered | dropping
        seg.next_fresh = state.valid.sum(dim=1)
    else:
        seg.cos_sin = chained
    fwd.segments = [s for s in fwd.segments if s.start < i] + [seg]
    fwd.boundaries.append(boundary(i, state))
    return hidden, state


def trim_cache(session: Session, fwd: Forward, start: int) -> list[Segment]:
    """Keep in the KV cache of layers `start`.. only the tokens of a prefill's last segment.

    Every later stage only drops tokens, so the final tokens are a subset of each earlier segment's,
    found by their input positions (ascending in every segment).
    """
    final = fwd.segments[-1]
    ends = [s.start for s in fwd.segments[1:]] + [session.adapter.num_layers]
    target = final.state.index  # [B, Lf], -1 on padding slots
    for seg, end in zip(fwd.segments[:-1], ends[:-1], strict=True):
        layers = range(max(seg.start, start), end)
        if not layers:
            continue
        slots = torch.searchsorted(seg.state.index.contiguous(), target.contiguous())  # [B, Lf]
        slots = slots.clamp(max=seg.state.length - 1)
        filled = (target >= 0)[:, None, :, None]  # [B, 1, Lf, 1]
        for j in layers:
            keys, values = surface.layer_kv(fwd.cache, j)
            idx = slots[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])  # [B, Hkv, Lf, D]
            surface.set_layer_kv(fwd.cache, j, keys.gather(2, idx) * filled, values.gather(2, idx) * filled)
    kept = [s for s in fwd.segments if s.start < start]
    tail = Segment(
        start, final.state, compacted=True, next_fresh=final.next_fresh, renumbered=final.renumbered, shift=final.shift
    )
    return [*kept, tail]


def touched(fwd: Forward, i: int) -> bool:
    """Layer `i` needs vtc's arguments: this forward or an earlier one changed what it sees or caches."""
    return fwd.segment_at(i).compacted or (fwd.record is not None and fwd.record.compacted_at(i))


def layer_kwargs(session: Session, i: int, hidden: torch.Tensor, kwargs: dict, fwd: Forward) -> None:
    """Replace layer `i`'s mask, rotary embeddings and position ids with what its tokens need."""
    seg = fwd.segment_at(i)
    if seg.compacted:
        kwargs[surface.POSITION_EMBEDDINGS] = seg.cos_sin
    elif fwd.record is not None and fwd.record.renumbered_at(i) is not None:
        kwargs[surface.POSITION_EMBEDDINGS] = source_cos_sin(session, i, hidden, kwargs, fwd)
    # Kept positions have gaps; position ids would read as packed sequences to flash attention,
    # and no layer needs them once the rotary embeddings are set.
    if surface.POSITION_IDS in kwargs:
        kwargs[surface.POSITION_IDS] = None
    kind = session.adapter.layer_types[i]
    # Layers whose every chunk sits in the same segment share a mask.
    key = (kind, seg.start, *(c.segment_at(i).start for c in (fwd.record.chunks if fwd.record else ())))
    if key not in fwd.masks:
        fwd.masks[key] = layer_mask(session, i, kind, hidden, fwd)
    kwargs[surface.ATTENTION_MASK] = fwd.masks[key]


def layer_mask(session: Session, i: int, kind: str, hidden: torch.Tensor, fwd: Forward) -> Any:
    """Build the mask of layer `i` (before its cache update) with transformers' mask functions.

    Columns: each recorded chunk's cache slots in this layer, the dense tokens cached after them, then
    this forward's current tokens; each hidden where vtc padded or the caller's 2-D mask hides it.
    """
    parts = []
    if fwd.kind is not ForwardKind.PREFILL:
        if fwd.user_mask is not None and fwd.user_mask.shape[1] != fwd.column + fwd.length:
            raise ValueError(
                f"the attention mask has {fwd.user_mask.shape[1]} columns but the tokens fed before "
                f"({fwd.column}) plus this forward's {fwd.length} need {fwd.column + fwd.length}."
            )
        if fwd.record is not None:
            parts += [chunk.valid_at(i, fwd.user_mask) for chunk in fwd.record.chunks]
        if fwd.dense_before:
            start = fwd.record.columns if fwd.record is not None else 0
            if fwd.user_mask is not None:
                parts.append(fwd.user_mask[:, start : start + fwd.dense_before].bool())
            else:
                parts.append(torch.ones(hidden.shape[0], fwd.dense_before, dtype=torch.bool, device=hidden.device))
    parts.append(fwd.segment_at(i).state.valid)
    mask2d = torch.cat(parts, dim=1)
    return surface.causal_mask(
        session.adapter.text_config,
        hidden,
        None if bool(mask2d.all()) else mask2d,
        fwd.cache,
        i if fwd.cache is not None else None,
        sliding=kind == "sliding_attention",
    )
