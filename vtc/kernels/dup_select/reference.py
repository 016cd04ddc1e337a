"""Torch reference of ``dup_select``: DART's least-duplicated picks, pivot by pivot."""

from __future__ import annotations

import torch

from vtc.kernels._checks import check_same_device, check_tensor

OP = "dup_select"


def check_dup_select_args(feats: torch.Tensor, pivots: torch.Tensor, counts: torch.Tensor, pool: torch.Tensor) -> None:
    """Raise ``ValueError`` for a call that breaks ``dup_select``'s contract (shapes, dtypes, devices)."""
    check_tensor(OP, "feats", feats, (None, None, None), "float")
    batch, n, dim = feats.shape
    check_tensor(OP, "pivots", pivots, (batch, None, dim), "float")
    check_tensor(OP, "counts", counts, (batch, pivots.shape[1]), "int")
    check_tensor(OP, "pool", pool, (batch, n), "bool")
    check_same_device(OP, feats=feats, pivots=pivots, counts=counts, pool=pool)


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
    lower index); picked tokens leave the pool. A pivot that asks for more tokens than remain takes all;
    a negative count picks nothing.

    Args:
        feats: ``[B, N, D]`` candidate features.
        pivots: ``[B, P, D]`` pivot features, in processing order.
        counts: ``[B, P]`` picks per pivot (non-negative integers).
        pool: ``[B, N]`` tokens that may be picked.
        eps: floor on feature norms, so an all-zero vector has similarity 0 to everything.

    Returns:
        ``[B, N]`` boolean mask of picked tokens.
    """
    check_dup_select_args(feats, pivots, counts, pool)
    f = feats.float()
    p = pivots.float()
    # The raw dot over the product of the norms (rather than a dot of normalised vectors): equal to the
    # cosine, and two tokens whose similarities tie exactly keep the tie whatever order a kernel sums in.
    f_norm = f.square().sum(dim=-1).sqrt().clamp_min(eps)  # [B, N]
    p_norm = p.square().sum(dim=-1).sqrt().clamp_min(eps)  # [B, P]
    sims = torch.einsum("bpd,bnd->bpn", p, f) / (p_norm[:, :, None] * f_norm[:, None, :])  # [B, P, N]
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
