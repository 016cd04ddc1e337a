"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided pruning with token recycling.

Visual tokens matter when the question looks at them. From the input embeddings SparseVLM picks
"raters": the text tokens most relevant to the image. After chosen decoder layers it scores each
visual token by the raters' attention to it (softmax rows of that layer, mean over heads and raters),
keeps the best by a fixed schedule, and recycles part of the rest: the best-scored pruned tokens are
clustered (density-peak clustering) and each cluster is merged into one token.

The default is v1.5 (the ICML code: prune after layers 2, 6, 15 of 32 with fixed schedules); the v1
rank-adaptive count (after layers 2, 6, 15, 19, as v1's code) is an option. The attention rows come from
vtc's tap (``vtc.kernels.attn_rows``), never an L x L matrix. See docs/METHODS.md for the choices that
differ from the official code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from vtc.budget import Budget, check_budget
from vtc.config import MethodConfig, check_fraction, check_int, check_layers
from vtc.method import AttentionCall, AttentionScoredPruner, HookPoint, LayerContext, Selection, register_method
from vtc.methods.attention import padded_positions, raters, visual_attention
from vtc.methods.recycling import recycle, recycle_counts
from vtc.methods.sparsevlm_schedule import RANK_RULE, SCHEDULES, rank_keep, stage_target, stages


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseVLMConfig(MethodConfig):
    """Settings of SparseVLM. One of ``budget``, ``keep``, ``keep_ratio``, ``schedule`` sets the counts.

    Attributes:
        budget: the paper's nominal budget (64, 96, 128, 192): the v1.5 schedule for 576 visual tokens,
            scaled to each row's visual count.
        keep: a budget of N visual tokens of each row, read as the paper reads its budgets: the schedule
            of ``keep_ratio = N / (the row's visual tokens)`` (``keep=192`` of 576 is ``budget=192``).
        keep_ratio: the budget as a fraction of the visual tokens (between the paper's schedules the counts
            are interpolated; 1.0 keeps everything).
        schedule: explicit visual tokens kept after each pruning layer, for 576 visual tokens (scaled).
        layers: prune the outputs of these layers; None = the paper's 2, 6, 15 of 32 (v1: 2, 6, 15, 19),
            scaled to the depth; stages that land on one layer merge (the last one's count).
        recycle: merge part of the pruned tokens back as cluster tokens.
        recycle_ratio: share of the pruned tokens (best scored) that are clustered.
        cluster_ratio: clusters per clustered token.
        rank_adaptive: v1: keep ``int(rank(P) * rank_scale + rank_bias)`` per layer instead of a schedule.
        rank_scale, rank_bias: the v1 rule's factors; None = the official script's for the budget.
    """

    exclusive = (("budget", "keep", "keep_ratio", "schedule"),)

    budget: int | None = None
    keep: int | None = None
    keep_ratio: float | None = None
    schedule: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3
    cluster_ratio: float = 0.1
    rank_adaptive: bool = False
    rank_scale: float | None = None
    rank_bias: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self, "sparsevlm", default={"budget": 192})
        if self.budget is not None and self.budget not in SCHEDULES:
            raise ValueError(
                f"sparsevlm: budget must be one of the paper's {sorted(SCHEDULES)}; got {self.budget!r}. "
                f"Use keep_ratio for other budgets."
            )
        for k in self.schedule or ():
            check_int("sparsevlm", "schedule entries", k, 0)
        check_layers("sparsevlm", self.layers)
        if None not in (self.schedule, self.layers) and len(self.schedule) != len(self.layers):
            raise ValueError("sparsevlm: schedule needs one count per pruning layer.")
        check_fraction("sparsevlm", "recycle_ratio", self.recycle_ratio, closed_low=True)
        check_fraction("sparsevlm", "cluster_ratio", self.cluster_ratio)
        if self.rank_adaptive and self.budget not in RANK_RULE and None in (self.rank_scale, self.rank_bias):
            raise ValueError(
                f"sparsevlm: rank_adaptive has official factors for budgets {sorted(RANK_RULE)}; "
                f"for others set rank_scale and rank_bias."
            )


@register_method
class SparseVLM(AttentionScoredPruner):
    """SparseVLM: raters at the embeddings, attention taps at the pruning layers, stages after them."""

    name = "sparsevlm"
    config_cls = SparseVLMConfig
    hooks = frozenset({HookPoint.EMBEDS, HookPoint.LAYER, HookPoint.ATTENTION})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"budget": 192},
        "r128": {"budget": 128},
        "r96": {"budget": 96},
        "r64": {"budget": 64},
        "noop": {"keep_ratio": 1.0},
    }

    config: SparseVLMConfig

    def __init__(self, config: SparseVLMConfig) -> None:
        super().__init__(config)
        self._raters: torch.Tensor | None = None  # [B, L_input] text tokens that rate
        self._initial: torch.Tensor | None = None  # [B, 1] visual tokens of the input
        self._ranks: dict[int, torch.Tensor] = {}  # tapped layer -> [B] rank of the rater attention (v1)

    # -- layers and counts --------------------------------------------------------------------------
    def scored_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(sorted(stages(self.config, num_layers)))

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.scored_layers(adapter.num_layers)  # checks the layers against the schedule on this depth

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0, *super().prune_layers(num_layers))  # layer 0 only reads the embeddings (raters)

    def _kept(self, stage: int, n_initial: torch.Tensor) -> torch.Tensor:
        """Visual tokens kept at `stage` for `n_initial` input ones: the schedule scaled from 576 tokens."""

        def rule(n: torch.Tensor) -> torch.Tensor:
            return n if self.budget.keeps_everything else torch.round(stage_target(self.config, stage, n))

        return self.budget.resolve(n_initial, paper=rule, ratio=rule, keep=rule)  # the schedules read every budget

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        if self.config.rank_adaptive:
            raise ValueError("sparsevlm: rank-adaptive counts depend on the input; measure with handle.stats.")
        num_layers = len(visual_per_layer)
        out = list(visual_per_layer)
        initial = torch.tensor([visual_per_layer[0]])
        for layer, stage in sorted(stages(self.config, num_layers).items()):
            before = torch.tensor([out[layer + 1]])
            kept = torch.minimum(self._kept(stage, initial), before)
            if self.config.recycle:
                kept = kept + recycle_counts(before - kept, self.config.recycle_ratio, self.config.cluster_ratio)[1]
            out[layer + 1 :] = [int(kept[0])] * (num_layers - layer - 1)
        return out

    # -- hooks --------------------------------------------------------------------------------------
    def on_forward_start(self) -> None:
        super().on_forward_start()
        self._raters, self._initial, self._ranks = None, None, {}

    def tap(self, call: AttentionCall) -> torch.Tensor | None:
        state = call.state
        rating = self._raters.gather(1, state.index.clamp(min=0)) & (state.index >= 0)  # [B, L] current slots
        if not self.config.rank_adaptive:
            return visual_attention(call, rating)  # mean over heads and raters
        rows, row_valid = padded_positions(rating)
        columns, col_valid = padded_positions(state.visual & state.valid)
        if rows.shape[1] == 0 or columns.shape[1] == 0:
            return None
        attn = call.rows(rows, columns, row_valid=row_valid, row_reduce="none")  # [B, R, S]
        self._ranks[call.layer_idx] = torch.stack([
            torch.linalg.matrix_rank(attn[b][row_valid[b]][:, col_valid[b]]) for b in range(attn.shape[0])
        ])  # fmt: skip
        attn = (attn * row_valid[..., None]).sum(dim=1) / row_valid.sum(dim=1, keepdim=True).clamp(min=1)  # [B, S]
        scores = torch.zeros(state.index.shape, dtype=attn.dtype, device=attn.device)
        return scores.scatter_(1, columns, attn * col_valid)  # [B, S] -> [B, L]

    def num_keep(self, ctx: LayerContext, present: torch.Tensor) -> torch.Tensor:
        tapped = self.tapped_for(ctx.layer_idx)
        if self.config.rank_adaptive:  # v1: k = int(rank x scale + bias), per row
            return rank_keep(self._ranks[tapped], self.config)[:, None]  # [B] -> [B, 1]
        return self._kept(stages(self.config, ctx.adapter.num_layers)[tapped], self._initial)

    def select(self, ctx: LayerContext) -> Selection | torch.Tensor | None:
        if ctx.layer_idx == 0:
            self._raters = raters(ctx.hidden, ctx.state)
            self._initial = Budget.count(ctx.state.visual & ctx.state.valid, torch.zeros_like(ctx.state.index))
            return None
        return super().select(ctx)

    def finish(self, ctx: LayerContext, scores: torch.Tensor, keep: torch.Tensor) -> Selection:
        pruned = ctx.state.visual & ctx.state.valid & ~keep
        if not self.config.recycle or not bool(pruned.any()):
            return Selection(keep)
        c = self.config
        hidden, centres = recycle(
            ctx.hidden, scores, pruned, recycle_ratio=c.recycle_ratio, cluster_ratio=c.cluster_ratio
        )
        return Selection(keep | centres, hidden=hidden)
