"""MustDrop's dual-attention rule, by thresholds (the paper) or at a budget (a per-row threshold search).

The rule drops a visual token when the text's total attention to it is below ``tau_g`` of all visual
tokens' total *and* no text token's attention to it reaches ``tau_i``. Scaling both thresholds by one
factor ``s`` drops a token exactly when ``s > max(g / (tau_g G), m / tau_i)``, so the dropped set only
grows with ``s``. Searching, per row, the smallest ``s`` that leaves ``k`` tokens is therefore the same as
keeping the ``k`` tokens with the largest *critical scale* ``max(g / (tau_g G), m / tau_i)``: a budget is
hit exactly, with the paper's thresholds setting the balance between the two conditions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vtc.budget import keep_top_k
from vtc.config import check_fraction, check_int, check_layers

#: Added to the critical scale of protected tokens (the key set): they go only when the budget is smaller.
PROTECTED = 1e12


def threshold_keep(g: torch.Tensor, m: torch.Tensor, visual: torch.Tensor, tau_g: float, tau_i: float) -> torch.Tensor:
    """``[B, L]`` bool: the visual tokens the dual rule keeps (the paper's thresholds)."""
    total = (g * visual).sum(dim=1, keepdim=True)
    drop = visual & (g < tau_g * total) & (m < tau_i)
    return visual & ~drop


def critical_scale(g: torch.Tensor, m: torch.Tensor, visual: torch.Tensor, tau_g: float, tau_i: float) -> torch.Tensor:
    """``[B, L]`` fp64: the factor on both thresholds above which the dual rule drops each token.

    Args:
        g: ``[B, L]`` the text's total attention to each token; m: ``[B, L]`` its largest single one.
        visual: ``[B, L]`` the visual tokens that compete.
        tau_g, tau_i: the thresholds whose ratio is kept (zero thresholds count as the smallest float).
    """
    g, m = g.double() * visual, m.double() * visual
    total = g.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    tiny = torch.finfo(torch.float64).tiny
    return torch.maximum(g / (max(tau_g, tiny) * total), m / max(tau_i, tiny))


def stage_counts(n_input: torch.Tensor, n_final: torch.Tensor, stages: int) -> list[torch.Tensor]:
    """Visual tokens kept after each of `stages` filter stages: geometric steps from `n_input` to `n_final`.

    The paper sets no per-stage counts (its thresholds drop what they drop at each stage); a geometric
    schedule drops the same share at every stage and ends at the budget.
    """
    n0 = n_input.double().clamp(min=1)
    share = n_final.double() / n0
    return [torch.round(n0 * share ** ((j + 1) / stages)).long().minimum(n_input) for j in range(stages)]


def dual_keep(
    scores: torch.Tensor,
    visual: torch.Tensor,
    keys: torch.Tensor | None,
    tau_g: float,
    tau_i: float,
    k: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, L]`` bool kept visual tokens: by the thresholds (`k` None), or the `k` per row of the budget.

    Args:
        scores: ``[B, L, 2]`` the text's total (g) and largest (m) attention to each token.
        visual: ``[B, L]`` the visual tokens that compete; keys: ``[B, L]`` the key set, or None.
        k: ``[B]`` tokens to keep per row (capped at the row's visual tokens), or None for the thresholds.
    """
    g, m = scores.unbind(dim=-1)  # [B, L, 2] -> [B, L] each
    keys = None if keys is None else keys & visual
    if k is None:
        keep = threshold_keep(g, m, visual, tau_g, tau_i)
        return keep if keys is None else keep | keys  # the key set is never dropped
    scale = critical_scale(g, m, visual, tau_g, tau_i)
    if keys is not None:  # kept before any other token; only a budget below the key set cuts into it
        scale = scale + PROTECTED * keys
    return keep_top_k(scale, torch.minimum(k, visual.sum(dim=1)), visual)


def planned_counts(visual_per_layer: list[int], layers: tuple[int, ...], resolve: Callable) -> list[int]:
    """Visual tokens entering each layer when filter stages after `layers` keep the geometric counts."""
    out, n0 = list(visual_per_layer), torch.tensor([visual_per_layer[0]])
    for layer, k in zip(layers, stage_counts(n0, resolve(n0), len(layers)), strict=True):
        out[layer + 1 :] = [min(int(k[0]), out[layer + 1])] * (len(out) - layer - 1)
    return out


def check_settings(config) -> None:
    """Validate a ``MustDropConfig``'s merge, key set, threshold and layer settings, naming what is valid."""
    if config.merge not in ("auto", "tower", "embeddings", "off"):
        raise ValueError(f"mustdrop: merge must be 'auto', 'tower', 'embeddings' or 'off'; got {config.merge!r}.")
    check_int("mustdrop", "merge_window", config.merge_window, 2)
    if not -1.0 <= config.merge_threshold <= 1.0:
        raise ValueError(f"mustdrop: merge_threshold is a cosine in [-1, 1]; got {config.merge_threshold!r}.")
    check_int("mustdrop", "merge_after", config.merge_after, 0)
    check_fraction("mustdrop", "key_ratio", config.key_ratio)
    for name in ("global_threshold", "individual_threshold"):
        check_fraction("mustdrop", name, getattr(config, name), closed_low=True)
    check_layers("mustdrop", config.layers)
