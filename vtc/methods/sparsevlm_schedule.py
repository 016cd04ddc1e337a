"""SparseVLM's budgets: the official per-stage schedules, their interpolation, and the v1 rank rule.

The paper's budget (64, 96, 128, 192) is a *layer-averaged* count; the official code reaches it with a
fixed number of visual tokens kept after each pruning layer, stated for LLaVA-1.5's 576 visual tokens
and 32 layers. vtc scales those counts to each input's visual tokens and the layers to the model's depth.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vtc.methods.sparsevlm import SparseVLMConfig

REFERENCE_TOKENS, REFERENCE_DEPTH = 576, 32  # LLaVA-1.5: the schedules and layers are stated for these
PAPER_LAYERS = (2, 6, 15)
# v1.5 (official main, USE_VERSION=1_0): visual tokens kept after layers 2, 6, 15, per nominal budget.
SCHEDULES: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
# v1 rank-adaptive rule k = int(rank * scale + bias), script defaults per budget.
RANK_RULE: dict[int, tuple[float, float]] = {64: (0.8, 0.0), 128: (9.0, 6.0), 192: (13.5, 0.0)}


def interpolated_schedule(ratio: float) -> tuple[float, float, float]:
    """Kept counts (of 576) for a budget fraction, between the paper's schedules and keep-all at 1.0."""
    points = [(b / REFERENCE_TOKENS, tuple(float(x) for x in SCHEDULES[b])) for b in sorted(SCHEDULES)]
    points.append((1.0, (float(REFERENCE_TOKENS),) * 3))
    if ratio <= points[0][0]:
        return tuple(x * ratio / points[0][0] for x in points[0][1])
    for (r0, s0), (r1, s1) in itertools.pairwise(points):
        if ratio <= r1:
            w = (ratio - r0) / (r1 - r0)
            return tuple(a + w * (b - a) for a, b in zip(s0, s1, strict=True))
    return points[-1][1]


def reference_schedule(config: SparseVLMConfig) -> tuple[float, ...] | None:
    """Visual tokens kept after each pruning layer, for 576 input tokens; None in rank-adaptive mode.

    ``schedule`` as given, ``budget`` as the official schedule, ``keep_ratio`` interpolated between them.
    """
    if config.rank_adaptive:
        return None
    if config.schedule is not None:
        return tuple(float(x) for x in config.schedule)
    if config.budget is not None:
        return tuple(float(x) for x in SCHEDULES[config.budget])
    return interpolated_schedule(config.keep_ratio)


def rank_keep(ranks: torch.Tensor, config: SparseVLMConfig) -> torch.Tensor:
    """v1's count ``int(rank x scale + bias)`` for ``[B]`` ranks of the raters' attention (official factors)."""
    default = RANK_RULE.get(config.budget, (None, None))
    scale = config.rank_scale if config.rank_scale is not None else default[0]
    return torch.floor(ranks.double() * scale + (config.rank_bias or default[1] or 0.0)).long()
