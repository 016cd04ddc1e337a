"""Torch reference of ``dup_select``: DART's least-duplicated picks, pivot by pivot."""

from __future__ import annotations

import torch


def dup_select_reference(
    feats: torch.Tensor,
    pivots: torch.Tensor,
    counts: torch.Tensor,
    pool: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Greedy duplication-aware selection.

    For each pivot ``p`` in order (``0..P-1``), among the pool tokens not yet picked, pick the
    ``counts[:, p]`` tokens whose features have the lowest cosine similarity to pivot ``p`` (ties go to the
    lower index); picked tokens leave the pool. A pivot that asks for more tokens than remain takes all.

    Args:
        feats: ``[B, N, D]`` candidate features.
        pivots: ``[B, P, D]`` pivot features, in processing order.
        counts: ``[B, P]`` picks per pivot (non-negative integers).
        pool: ``[B, N]`` tokens that may be picked.
        eps: floor on feature norms, so an all-zero vector has similarity 0 to everything.

    Returns:
        ``[B, N]`` boolean mask of picked tokens.
    """
    f = feats.float()
    p = pivots.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(eps)
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(eps)
    sims = torch.einsum("bpd,bnd->bpn", p, f)  # [B, P, N]
    available = pool.clone()
    picked = torch.zeros_like(pool)
    ranks = torch.arange(feats.shape[1], device=feats.device)
    for j in range(pivots.shape[1]):
        key = sims[:, j].masked_fill(~available, float("inf"))
        order = torch.sort(key, dim=1, stable=True).indices  # [B, N] least similar first
        take = ranks < torch.minimum(counts[:, j], available.sum(dim=1))[:, None]  # [B, N] by rank
        chosen = torch.zeros_like(pool).scatter(1, order, take)  # back to token order
        picked |= chosen
        available &= ~chosen
    return picked
