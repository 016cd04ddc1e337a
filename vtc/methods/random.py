"""Random pruning: the baseline that scoring methods have to beat (DART's paper reports it beside DART).

At the input of one decoder layer (default 2, DART's K) it keeps a seeded random subset of each row's visual
tokens (or of each image's, with ``budget_scope="image"``). The subset is a fixed function of the seed and
each token's ordinal among its row's visual tokens (an integer hash), so it does not depend on the batch,
the padding or the device: a row of a padded batch keeps the same tokens as that row alone, and every run
of a seed keeps the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from vtc.budget import Scope, check_budget
from vtc.config import MethodConfig, check_int
from vtc.method import LayerContext, ScoringPruner, register_method
from vtc.methods.layers import resolve_layer

_MASK32 = 0xFFFFFFFF


def token_hash(ordinal: torch.Tensor, seed: int) -> torch.Tensor:
    """A 32-bit integer hash of ``ordinal`` (any int tensor) mixed with ``seed``: random-looking, reproducible."""
    x = (ordinal.long() + (seed * 0x9E3779B9 + 0x7F4A7C15)) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomConfig(MethodConfig):
    """Settings of random pruning. ``keep`` or ``keep_ratio`` sets how many visual tokens stay.

    Attributes:
        layer: decoder layer whose input is pruned (0 prunes the embeddings).
        keep: visual tokens kept per unit (all of them when a unit has fewer).
        keep_ratio: fraction of each unit's visual tokens kept (rounded down).
        budget_scope: the unit (``vtc.budget.Scope``): ``"row"``, ``"image"``, ``"frame"`` or ``"crop"``.
        seed: picks the subset; the same seed keeps the same tokens.
    """

    exclusive = (("keep", "keep_ratio"),)

    layer: int = 2
    keep: int | None = None
    keep_ratio: float | None = None
    budget_scope: Scope = "row"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self, "random", default={"keep": 128})
        check_int("random", "layer", self.layer, -10_000)
        check_int("random", "seed", self.seed, 0)


@register_method
class Random(ScoringPruner):
    """Seeded random visual-token pruning at the input of one decoder layer (LAYER hook)."""

    name = "random"
    config_cls = RandomConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"keep": 192},
        "r128": {"keep": 128},
        "r64": {"keep": 64},
        "noop": {"keep_ratio": 1.0},
    }

    config: RandomConfig

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.prune_layers(adapter.num_layers)  # validates the layer against this model

    @property
    def fixed_counts(self) -> bool:  # type: ignore[override]
        return self.budget.scope == "row"  # per image, the counts depend on the images of each row

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return (resolve_layer("random", "layer", self.config.layer, num_layers),)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        state = ctx.state
        visual = state.visual & state.valid
        ordinal = visual.long().cumsum(dim=1) - 1  # [B, L] each slot's rank among its row's visual tokens
        return token_hash(ordinal, self.config.seed).double()  # exact in float64: values < 2**32

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        if self.budget.scope != "row":
            raise ValueError("random: per-image counts depend on the images; measure them with handle.stats.")
        k = self.prune_layers(len(visual_per_layer))[0]
        kept = int(self.budget.resolve(torch.tensor([visual_per_layer[k]]))[0])
        return visual_per_layer[:k] + [kept] * (len(visual_per_layer) - k)
