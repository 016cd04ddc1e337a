"""vtc's attention function: the model's own implementation, with taps and edits routed to a session.

A session that taps or edits attention switches the text model's (or the vision tower's) attention
implementation to ``vtc_<original>``, registered with transformers. That function runs the original
implementation unchanged, so sdpa and flash keep running, and hands the call to the session active on
the model when it taps or edits that layer. Edits recompute the one edited layer with eager maths; a
method's sparse attention (``Method.sparse_attention``) replaces a prefill call's output with its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc import surface
from vtc.method import AttentionCall

if TYPE_CHECKING:
    from vtc.engine.dispatch import ModelSessions

# Attention implementations under which an edit can rebuild the layer's weights from its mask.
EDITABLE_ATTENTION = ("sdpa", "eager")

# Attention module -> (the sessions of its model, "text" or "vision", layer index).
ROUTES: weakref.WeakKeyDictionary[nn.Module, tuple[ModelSessions, str, int]] = weakref.WeakKeyDictionary()


def edited_attention(
    module: nn.Module, query, key, value, attention_mask, scaling: float, edit: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one layer with post-softmax weights passed through `edit` (eager maths, this layer only).

    The mask is whatever the layer received: None (causal, sdpa's fast path), a bool mask (True = may
    attend, sdpa) or an additive float mask (eager).

    Returns:
        ``attn_output [B, Lq, Hq, D]`` and the edited weights ``[B, Hq, Lq, Lk]``, as eager attention does.
    """
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # [B, Hq, Lq, Lk]
    lq, lk = scores.shape[-2:]
    if attention_mask is None:
        rows = torch.arange(lq, device=scores.device)[:, None] + (lk - lq)
        allowed = torch.arange(lk, device=scores.device)[None, :] <= rows  # [Lq, Lk]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :lk], float("-inf"))
    else:
        scores = scores + attention_mask[..., :lk].float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully hidden row (padding) attends nothing
    probs = edit(probs)
    out = torch.matmul(probs.to(v.dtype), v)  # [B, Hq, Lq, D]
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


def _vtc_attention_for(original: str) -> Callable[..., Any]:
    """The vtc attention function wrapping implementation `original`."""

    def vtc_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        impl = surface.attention_function(original, module)
        route = ROUTES.get(module)
        session = route[0].active if route is not None else None
        if session is None or not session.attends(route[1], route[2]):
            return impl(module, query, key, value, attention_mask, **kwargs)
        part, layer = route[1], route[2]
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        causal = getattr(module, "is_causal", True)
        call = AttentionCall(layer, query, key, value, attention_mask, scaling, causal=causal)
        edit = session.attention_edit(part, call)
        sparse = session.sparse_attention(part, call) if edit is None else None
        if edit is not None:
            out = edited_attention(module, query, key, value, attention_mask, scaling, edit)
        elif sparse is not None:
            out = (sparse, None)
        else:
            out = impl(module, query, key, value, attention_mask, **kwargs)
        session.attention_tap(part, call)
        return out

    return vtc_attention


def register(original: str) -> str:
    """Register the vtc wrapper of `original` with transformers (attention and mask functions)."""
    name = f"vtc_{original}"
    if original not in surface.mask_implementations():
        raise ValueError(
            f"vtc cannot tap attention implementation {original!r}; load the model with "
            f"attn_implementation='sdpa' or 'eager' (or a flash-attention variant)."
        )
    surface.register_attention(name, _vtc_attention_for(original), masks_like=original)
    return name
