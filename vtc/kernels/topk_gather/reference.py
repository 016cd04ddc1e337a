"""Torch reference of ``topk_gather``: stable per-row top-k with sorted indices, and the gathers."""

from __future__ import annotations

from typing import NamedTuple

import torch

from vtc.kernels._checks import check_same_device, check_tensor, fail

OP = "topk_gather"


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

    def as_mask(self, length: int) -> torch.Tensor:
        """``[B, length]`` bool, true at the picked positions.

        Unused slots point at position 0, so scattering ``mask`` at ``indices`` could let an unused slot
        overwrite a real pick of position 0 (scatter order among equal indices is undefined); they are sent
        to an extra column instead, which is then dropped.
        """
        out = torch.zeros(self.indices.shape[0], length + 1, dtype=torch.bool, device=self.indices.device)
        return out.scatter_(1, torch.where(self.mask, self.indices, length), True)[:, :length]


def check_topk_args(
    scores: torch.Tensor, k: int | torch.Tensor, tensors: tuple[torch.Tensor, ...], valid: torch.Tensor | None
) -> None:
    """Raise ``ValueError`` for a call that breaks ``topk_gather``'s contract (shapes, dtypes, devices)."""
    check_tensor(OP, "scores", scores, (None, None), "real")
    batch, n = scores.shape
    if isinstance(k, torch.Tensor):
        check_tensor(OP, "k", k, (batch,), "int")
    elif not isinstance(k, int) or isinstance(k, bool):
        fail(OP, f"k must be an int or a [B] integer tensor; got {type(k).__name__}.")
    check_tensor(OP, "valid", valid, (batch, n), "bool", optional=True)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or tuple(t.shape[:2]) != (batch, n):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            fail(OP, f"tensors[{i}] must have shape [B, N, ...] = [{batch}, {n}, ...] like scores; got {got}.")
    check_same_device(OP, scores=scores, k=k if isinstance(k, torch.Tensor) else None, valid=valid)
    check_same_device(OP, scores=scores, **{f"tensors[{i}]": t for i, t in enumerate(tensors)})


def picks_per_row(scores: torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` picks of each row: ``k`` clamped to ``[0, N]`` and to the row's valid positions."""
    batch, n = scores.shape
    k_row = torch.as_tensor(k, device=scores.device).expand(batch).clamp(0, n)
    if valid is not None:
        k_row = torch.minimum(k_row, valid.sum(dim=1))
    return k_row


def topk_gather_reference(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *tensors: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> TopK:
    """Per-row top-k of `scores`, ties to the lower index, indices sorted, and a gather of `tensors`.

    Scores are compared as float32 (as the Triton kernel does), so two scores that round to the same
    float32 tie.

    Args:
        scores: ``[B, N]`` higher is better. NaN is not allowed.
        k: picks per row: an int, or ``[B]`` integers (a row's k may be 0).
        *tensors: token-axis tensors ``[B, N, ...]`` to gather at the picks.
        valid: ``[B, N]`` positions that may be picked; a row picks at most its number of valid positions.

    Returns:
        ``TopK`` with ``K = max(k)`` slots per row (capped at N and at each row's valid positions).
    """
    check_topk_args(scores, k, tensors, valid)
    n = scores.shape[1]
    k_row = picks_per_row(scores, k, valid)  # [B]
    width = int(k_row.max().item()) if k_row.numel() else 0
    key = scores.float()
    # A stable sort keeps equal scores in index order, so ties go to the lower index.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # [B, N] by rank
    if valid is not None:
        # Invalid positions rank after every valid one, even a valid -inf: a second stable sort on
        # validity keeps the score order within each group.
        valid_by_rank = valid.gather(1, order).to(torch.uint8)  # [B, N]
        order = order.gather(1, torch.sort(valid_by_rank, dim=1, descending=True, stable=True).indices)
    order = order[:, :width]  # [B, K]
    used = torch.arange(width, device=scores.device) < k_row[:, None]  # [B, K]
    # Sort the picks by position; unused slots get n so they land at the end.
    indices = torch.sort(torch.where(used, order, n), dim=1).values
    mask = indices < n
    indices = torch.where(mask, indices, 0)
    gathered = tuple(gather_tokens(t, indices) for t in tensors)
    return TopK(indices, mask, gathered)


def gather_tokens(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``t[b, indices[b]]`` for ``t`` of shape ``[B, N, ...]`` and ``indices`` ``[B, K]``: ``[B, K, ...]``."""
    idx = indices.reshape(*indices.shape, *([1] * (t.dim() - 2)))  # [B, K, 1, ...]
    return t.gather(1, idx.expand(*indices.shape, *t.shape[2:]))  # [B, K, ...]
