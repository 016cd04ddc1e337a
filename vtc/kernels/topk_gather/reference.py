"""Torch reference of ``topk_gather``: stable per-row top-k with sorted indices, and the gathers."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TopK(NamedTuple):
    """Result of ``topk_gather``.

    Attributes:
        indices: ``[B, K]`` chosen positions per row, ascending; unused slots (a row with fewer picks than
            ``K``) hold 0 and sit at the end.
        mask: ``[B, K]`` true for used slots.
        gathered: each input tensor gathered at `indices` along dim 1 (``[B, K, ...]``).
    """

    indices: torch.Tensor
    mask: torch.Tensor
    gathered: tuple[torch.Tensor, ...]


def topk_gather_reference(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *tensors: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> TopK:
    """Per-row top-k of `scores`, ties to the lower index, indices sorted, and a gather of `tensors`.

    Args:
        scores: ``[B, N]`` higher is better. NaN is not allowed.
        k: picks per row: an int, or ``[B]`` integers (a row's k may be 0).
        *tensors: token-axis tensors ``[B, N, ...]`` to gather at the picks.
        valid: ``[B, N]`` positions that may be picked; a row picks at most its number of valid positions.

    Returns:
        ``TopK`` with ``K = max(k)`` slots per row (capped at N).
    """
    batch, n = scores.shape
    k_row = torch.as_tensor(k, device=scores.device).expand(batch).clamp(0, n)
    if valid is not None:
        k_row = torch.minimum(k_row, valid.sum(dim=1))
    width = int(k_row.max().item()) if batch else 0
    key = scores.float()
    if valid is not None:
        key = key.masked_fill(~valid, float("-inf"))
    # A stable sort keeps equal scores in index order, so ties go to the lower index.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :width]  # [B, K] by rank
    used = torch.arange(width, device=scores.device) < k_row[:, None]  # [B, K]
    # Sort the picks by position; unused slots get n so they land at the end.
    indices = torch.sort(torch.where(used, order, n), dim=1).values
    mask = indices < n
    indices = torch.where(mask, indices, 0)
    gathered = tuple(_gather_tokens(t, indices) for t in tensors)
    return TopK(indices, mask, gathered)


def _gather_tokens(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``t[b, indices[b]]`` for ``t`` of shape ``[B, N, ...]``."""
    idx = indices.reshape(*indices.shape, *([1] * (t.dim() - 2))).expand(*indices.shape, *t.shape[2:])
    return t.gather(1, idx)
