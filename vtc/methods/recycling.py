"""Token recycling: pruned tokens that still carry something are clustered and merged back, one per cluster.

SparseVLM recycles after each pruning step: the best-scored share of the pruned tokens is clustered by
density peaks (DPC-kNN, as in TCFormer) and each cluster becomes one token, the mean of its members,
written into its centre's slot. The counts follow the official code: ``int(ratio x pruned) + 1``
candidates, ``int(candidates x cluster_ratio) + 1`` clusters.
"""

from __future__ import annotations

import math

import torch

from vtc import kernels


def density_peak_clusters(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN, as in TCFormer and SparseVLM).

    Args:
        x: ``[n, d]`` features.
        n_clusters: clusters c (also the neighbours that define density).

    Returns:
        ``centres [c]`` indices into x (in order of choice) and ``assign [n]`` cluster of each point.
    """
    n = x.shape[0]
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(x.shape[1])  # [n, n]
    k = min(n_clusters, n)
    nearest = torch.sort(dist, dim=1).values[:, :k]  # self included
    density = torch.exp(-(nearest**2).mean(dim=1))
    # [i, j]: j is denser than i. Equal densities go to the lower index (the official code adds random
    # noise instead); without a tie-break two equally dense points would both become centres.
    index = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    parent = torch.where(denser, dist, dist.max()).min(dim=1).values  # distance to the nearest denser point
    score = parent * density
    centres = torch.sort(score, descending=True, stable=True).indices[:n_clusters]
    assign = dist[:, centres].argmin(dim=1)  # first centre wins a tie
    assign[centres] = torch.arange(len(centres), device=x.device)
    return centres, assign


def recycle_counts(
    n_pruned: torch.Tensor, recycle_ratio: float, cluster_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` candidates and ``[B]`` clusters (merged tokens) made from ``[B]`` `n_pruned` pruned tokens.

    A row that pruned nothing makes no cluster; candidates are capped by the caller at what was pruned.
    """
    candidates = torch.floor(recycle_ratio * n_pruned).long() + 1
    clusters = torch.floor(candidates * cluster_ratio).long() + 1
    return candidates, torch.where(n_pruned > 0, clusters, 0)


def recycle(
    hidden: torch.Tensor, scores: torch.Tensor, pruned: torch.Tensor, *, recycle_ratio: float, cluster_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the best-scored pruned tokens and write each cluster's mean into its centre's slot.

    Args:
        hidden: ``[B, L, d]`` hidden states of the current slots.
        scores: ``[B, L]`` the stage's scores (higher = more worth recycling).
        pruned: ``[B, L]`` bool, the slots the stage pruned.
        recycle_ratio: share of the pruned tokens that are clustered (the best scored).
        cluster_ratio: clusters per clustered token.

    Returns:
        The new hidden states (only the centres' slots change) and ``[B, L]`` the centre slots, which the
        stage keeps as the merged tokens.
    """
    n_pruned = pruned.sum(dim=1)
    n_candidates, n_clusters = recycle_counts(n_pruned, recycle_ratio, cluster_ratio)
    picks = kernels.topk_gather(scores, torch.minimum(n_candidates, n_pruned), valid=pruned)  # [B, K] ascending
    hidden = hidden.clone()
    centres = torch.zeros_like(pruned)
    for b in range(hidden.shape[0]):  # rows differ in counts; each row clusters on its own
        slots = picks.indices[b][picks.mask[b]]
        if len(slots) == 0:
            continue
        feats = hidden[b, slots]  # [n, d]
        centre_idx, assign = density_peak_clusters(feats, int(n_clusters[b]))
        merged = torch.zeros(len(centre_idx), feats.shape[1], dtype=torch.float32, device=feats.device)
        merged.index_add_(0, assign, feats.float())
        merged /= torch.bincount(assign, minlength=len(centre_idx)).clamp(min=1)[:, None]
        hidden[b, slots[centre_idx]] = merged.to(hidden.dtype)
        centres[b, slots[centre_idx]] = True
    return hidden, centres
