"""Reading a tapped attention call: which rows look at the image, and what they pay to each visual token.

Text-guided pruners (SparseVLM, MustDrop's filter, FocusLLaVA's text stage) score visual tokens by the
attention the instruction (or SparseVLM's raters, its most image-relevant tokens) pays them.
``AttentionCall.rows`` computes those softmax rows without the L x L matrix; these helpers pick the
rows and columns and put the result back on the call's slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vtc.method import AttentionCall
    from vtc.state import VisualTokenState


def padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` bool -> ``[B, N]`` slot indices where true (ascending) and ``[B, N]`` validity, N = max count."""
    length = mask.shape[1]
    order = torch.where(mask, torch.arange(length, device=mask.device), length).sort(dim=1).values
    width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    order = order[:, :width]
    valid = order < length
    return torch.where(valid, order, 0), valid


def text_after_image(state: VisualTokenState) -> torch.Tensor:
    """``[B, L]`` bool: valid text slots after each row's first visual token (the question and the template).

    The text-guided methods read the instruction's attention to the image from these rows.
    """
    visual = state.visual & state.valid
    return ~state.visual & state.valid & (visual.long().cumsum(dim=1) > 0)


def visual_attention(call: AttentionCall, rows: torch.Tensor, *, row_reduce: str = "mean") -> torch.Tensor | None:
    """The attention `rows` pay to each valid visual slot of a tapped call, from the layer's softmax rows.

    Args:
        call: a tapped attention call (its ``state`` set).
        rows: ``[B, L]`` bool, the query slots that look.
        row_reduce: how the rows combine (``"mean"``, ``"sum"``, ``"max"``); heads are averaged.

    Returns:
        fp32 ``[B, L]`` over the call's slots (0 at non-visual slots), or None when no row looks or no
        visual token is present in the whole batch.
    """
    state = call.state
    queries, row_valid = padded_positions(rows)  # [B, R]
    columns, col_valid = padded_positions(state.visual & state.valid)  # [B, S]
    if queries.shape[1] == 0 or columns.shape[1] == 0:
        return None
    attn = call.rows(queries, columns, row_valid=row_valid, row_reduce=row_reduce)  # [B, S]
    length = state.index.shape[1]
    out = torch.zeros(attn.shape[0], length + 1, dtype=attn.dtype, device=attn.device)
    out.scatter_(1, torch.where(col_valid, columns, length), attn)  # [B, S] -> [B, L + 1]; padding to the spare
    return out[:, :length]


def raters(embeds: torch.Tensor, state: VisualTokenState) -> torch.Tensor:
    """SparseVLM's raters (Step A): text tokens after the image whose relevance to the image beats the mean.

    Relevance is each visual token's softmax over the text tokens' embeddings, averaged over the visual
    tokens. Where every text token is equally relevant (the official code divides by zero), all rate.

    Args:
        embeds: ``[B, L, d]`` the input embeddings.
        state: the tokens of that input.

    Returns:
        ``[B, L]`` bool, the rater slots.
    """
    e = embeds.float()
    visual = state.visual & state.valid
    text = text_after_image(state)
    logits = torch.einsum("bvd,btd->bvt", e, e).masked_fill(~text[:, None, :], float("-inf"))  # [B, L, L]
    relevance = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # each visual row over text columns
    relevance = (relevance * visual[..., None]).sum(dim=1) / visual.sum(dim=1, keepdim=True).clamp(min=1)  # [B, L]
    mean = (relevance * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
    chosen = text & (relevance > mean)
    return torch.where(chosen.any(dim=1, keepdim=True), chosen, text)
