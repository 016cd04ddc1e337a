"""SparseVLM's budgets: the official per-stage schedules, their interpolation, and the v1 rank rule.

The paper's budget (64, 96, 128, 192) is a *layer-averaged* count; the official code reaches it with a
fixed number of visual tokens kept after each pruning layer, stated for LLaVA-1.5's 576 visual tokens
and 32 layers. vtc scales those counts to each input's visual tokens and the layers to the model's depth.
On a shallow model several of the paper's layers can land on one layer; those stages then merge into
one, which keeps the last merged stage's count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vtc.methods.layers import output_layers

if TYPE_CHECKING:
    from vtc.methods.sparsevlm import SparseVLMConfig

REFERENCE_TOKENS, REFERENCE_DEPTH = 576, 32  # LLaVA-1.5: the schedules and layers are stated for these
PAPER_LAYERS = (2, 6, 15)  # v1.5 (the ICML code)
V1_LAYERS = (2, 6, 15, 19)  # v1 (rank-adaptive), its official code's pruning layers
# v1.5 (official main, USE_VERSION=1_0): visual tokens kept after layers 2, 6, 15, per nominal budget.
SCHEDULES: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
# v1 rank-adaptive rule k = int(rank * scale + bias), script defaults per budget.
RANK_RULE: dict[int, tuple[float, float]] = {64: (0.8, 0.0), 128: (9.0, 6.0), 192: (13.5, 0.0)}


def schedule_at(ratio: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` kept counts (of 576) for budget fractions ``[...]``: piecewise linear through the paper's
    schedules, from nothing at 0 to keep-all at 1."""
    xs = torch.tensor([0.0, *(b / REFERENCE_TOKENS for b in sorted(SCHEDULES)), 1.0], dtype=torch.float64)
    ys = torch.tensor(
        [[0.0] * 3, *(SCHEDULES[b] for b in sorted(SCHEDULES)), [float(REFERENCE_TOKENS)] * 3], dtype=torch.float64
    )  # [P, 3]
    r = ratio.double().clamp(0.0, 1.0)
    i = torch.searchsorted(xs, r.contiguous()).clamp(1, len(xs) - 1)  # r in (xs[i-1], xs[i]]
    w = ((r - xs[i - 1]) / (xs[i] - xs[i - 1]))[..., None]
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def interpolated_schedule(ratio: float) -> tuple[float, ...]:
    """Kept counts (of 576) for a budget fraction, between the paper's schedules and keep-all at 1.0."""
    return tuple(schedule_at(torch.tensor([ratio]))[0].tolist())


def reference_schedule(config: SparseVLMConfig) -> tuple[float, ...] | None:
    """Visual tokens kept after each pruning stage, for 576 input tokens; None when the input decides.

    ``schedule`` as given, ``budget`` as the official schedule, ``keep_ratio`` interpolated between them;
    None in rank-adaptive mode and for ``keep`` (its fraction depends on each row's visual tokens).
    """
    if config.rank_adaptive or config.keep is not None:
        return None
    if config.schedule is not None:
        return tuple(float(x) for x in config.schedule)
    if config.budget is not None:
        return tuple(float(x) for x in SCHEDULES[config.budget])
    return interpolated_schedule(config.keep_ratio)


def stage_target(config: SparseVLMConfig, stage: int, n: torch.Tensor) -> torch.Tensor:
    """Visual tokens (unrounded) that `stage` keeps of ``n`` input ones: the schedule scaled from 576.

    ``keep=N`` reads as the paper's schedule for a budget of N of each row's tokens (``keep_ratio=N/n``).
    """
    if config.keep is not None:
        counts = schedule_at(config.keep / n.double().clamp(min=1))[..., stage]
    else:
        counts = torch.full(n.shape, reference_schedule(config)[stage], dtype=torch.float64)
    return counts * n.double() / REFERENCE_TOKENS


def stages(config: SparseVLMConfig, num_layers: int) -> dict[int, int]:
    """Pruned layer -> index of the schedule stage it applies, on a model of `num_layers` layers.

    With ``layers`` given, one stage per layer. Otherwise the paper's layers (v1.5: 2, 6, 15; v1: 2, 6, 15,
    19) scaled to the depth; stages that land on one layer merge, keeping the last one's count.

    Raises:
        ValueError: the counts do not match the layers, naming what to pass.
    """
    if config.layers is not None:
        layers = output_layers("sparsevlm", config.layers, PAPER_LAYERS, num_layers, REFERENCE_DEPTH)
        schedule = reference_schedule(config)
        if schedule is not None and len(schedule) != len(layers):
            given = "schedule" if config.schedule is not None else "budget's schedule (for layers 2, 6, 15 of 32)"
            raise ValueError(
                f"sparsevlm: layers={config.layers} gives {len(layers)} pruning layers but the {given} has "
                f"{len(schedule)} counts; pass schedule= with {len(layers)} counts (visual tokens kept after "
                f"each layer, for 576 input tokens), or {len(schedule)} layers."
            )
        return {layer: i for i, layer in enumerate(layers)}
    paper = V1_LAYERS if config.rank_adaptive else PAPER_LAYERS
    schedule = reference_schedule(config)
    if schedule is not None and len(schedule) != len(paper):
        raise ValueError(
            f"sparsevlm: a schedule of {len(schedule)} counts needs layers= with {len(schedule)} layers; without "
            f"layers the paper's {len(paper)} ({', '.join(map(str, paper))} of 32) are used."
        )
    placed = [output_layers("sparsevlm", None, (x,), num_layers, REFERENCE_DEPTH)[0] for x in paper]
    return {layer: i for i, layer in enumerate(placed)}  # a later stage on the same layer wins


def rank_keep(ranks: torch.Tensor, config: SparseVLMConfig) -> torch.Tensor:
    """v1's count ``int(rank x scale + bias)`` for ``[B]`` ranks of the raters' attention (official factors).

    An explicit factor is used as given (``rank_bias=0.0`` is a bias of 0, not the script's default).
    """
    default = RANK_RULE.get(config.budget, (None, None))
    scale = config.rank_scale if config.rank_scale is not None else default[0]
    bias = config.rank_bias if config.rank_bias is not None else default[1]
    return torch.floor(ranks.double() * scale + bias).long()
