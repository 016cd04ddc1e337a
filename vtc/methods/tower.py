"""Stages inside a vision tower: window merges of its patch grid, and the patches its CLS token picks.

MustDrop merges similar windows right after the tower's first layer and protects the patches the CLS
token attends to most in its last layer; both work on each image's own square grid (CLS first when the
tower has one), the layout ``VisionContext`` describes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vtc.budget import keep_top_k
from vtc.errors import MissingCapabilityError
from vtc.method import AttentionCall, Selection, VisionContext
from vtc.methods.attention import visual_attention
from vtc.methods.windows import grid_windows, merge_windows

if TYPE_CHECKING:
    from vtc.adapters.base import Adapter
    from vtc.state import VisualTokenState


def place_tower_stages(method: str, merge: str, key_set: bool | None, adapter: Adapter) -> tuple[str, bool]:
    """Where a window merge runs on this family, and whether a CLS key set is taken.

    Args:
        method: the method's name, for messages.
        merge: ``"auto"`` (in the tower where the family runs tower stages, else on the embeddings),
            ``"tower"``, ``"embeddings"`` or ``"off"``.
        key_set: take the key set; None = where the tower has a CLS token.

    Returns:
        ``(merge place, key set)``.

    Raises:
        MissingCapabilityError: a stage was asked for that the family cannot host, with the setting to change.
    """
    caps = adapter.capabilities
    if merge == "auto":
        merge = "tower" if "vision_stage" in caps else "embeddings"
    if merge == "tower" and "vision_stage" not in caps:
        raise MissingCapabilityError(
            f"{method}: merge='tower' needs stages inside the vision tower, which the {adapter.name!r} "
            f"adapter does not provide; use merge='embeddings' (or 'auto')."
        )
    use_key_set = "vision_cls_attn" in caps if key_set is None else key_set
    if use_key_set and "vision_cls_attn" not in caps:
        raise MissingCapabilityError(
            f"{method}: the key set needs the vision tower's CLS attention, which the {adapter.name!r} "
            f"adapter does not provide (its tower has no CLS token); set key_set=False."
        )
    return merge, use_key_set


def merge_tower_windows(ctx: VisionContext, side: int, threshold: float) -> tuple[Selection, torch.Tensor]:
    """Merge each image's nearly identical side x side windows of tower patches.

    Returns:
        The tower selection (merged means in each window's last token) and ``[N, patches]`` bool, the
        patches merged away (CLS column dropped).
    """
    offset = 1 if ctx.has_cls else 0
    windows = grid_windows(ctx.grid, ctx.grid, side).to(ctx.hidden.device) + offset  # [W, side^2] token slots
    hidden, keep = ctx.hidden.clone(), ctx.valid.clone()
    for i in range(hidden.shape[0]):  # each image merges its own windows (the paper: min over a batch)
        hidden[i], gone, _ = merge_windows(hidden[i], windows, threshold)
        keep[i] &= ~gone
    return Selection(keep, hidden=hidden), ~keep[:, offset:]


def cls_key_set(call: AttentionCall, ratio: float) -> torch.Tensor:
    """MustDrop's key set: the patches a tower layer's CLS row attends to most, ``ceil(ratio x patches)``.

    Returns:
        ``[N, T - 1]`` bool over the patches (CLS column dropped), for the call's ``[N, T]`` tower tokens.
    """
    patches = call.state.visual & call.state.valid  # [N, T]
    cls_row = torch.zeros_like(patches)
    cls_row[:, 0] = True
    scores = visual_attention(call, cls_row)  # [N, T]: the CLS row over the patches still present, head mean
    k = torch.ceil(ratio * patches.sum(dim=1).double()).long()
    return keep_top_k(scores, k, patches)[:, 1:]


def tower_to_llm(tower: torch.Tensor, state: VisualTokenState, has_cls: bool) -> torch.Tensor:
    """Per-patch values of all images in the batch, onto the LLM's visual tokens, by the visual layout.

    Each LLM visual token reads the value of the tower patch it stands for (``VisualLayout.tower``), in
    the image it belongs to (``item``), so the map holds whatever the order of images and tokens.

    Args:
        tower: ``[N images, patches]`` per-patch values (CLS excluded).
        state: the LLM input's token state.
        has_cls: the tower puts a CLS token at position 0 (its patches start at 1).

    Returns:
        ``[B, L]`` the values at the LLM's visual slots, false elsewhere.
    """
    visual = state.visual & state.valid
    if state.layout is None:
        raise ValueError("mustdrop: this model family reports no visual layout; use merge='embeddings', key_set=False.")
    item = state.layout.field("item")
    patch = state.layout.tower[..., 0] - int(has_cls)  # [B, L] position among the image's patches
    on = visual & (item >= 0) & (patch >= 0)
    if int(visual.sum()) != int(on.sum()) or (bool(on.any()) and (
        int(item[on].max()) >= tower.shape[0] or int(patch[on].max()) >= tower.shape[1]
    )):  # fmt: skip
        raise ValueError(
            f"mustdrop: the vision tower saw {tower.shape[0]} images of {tower.shape[1]} patches, which do not "
            f"cover the prompt's {int(visual.sum())} image tokens; merge='tower' and the key set need the "
            f"images batched with their prompts (beam search is not supported with merge='tower')."
        )
    out = torch.zeros_like(visual)
    out[on] = tower.to(out.device)[item[on], patch[on]]
    return out
