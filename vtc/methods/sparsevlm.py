"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided pruning with token recycling.

Visual tokens matter when the question looks at them. From the input embeddings SparseVLM picks
"raters": the text tokens most relevant to the image. After chosen decoder layers it scores each
visual token by the raters' attention to it (softmax rows of that layer, mean over heads and raters),
keeps the best by a fixed schedule, and recycles part of the rest: the best-scored pruned tokens are
clustered (density-peak clustering) and each cluster is merged into one token.

The default is v1.5 (the ICML code: prune after layers 2, 6, 15 of 32 with fixed schedules); the v1
rank-adaptive count is an option. The attention rows come from vtc's tap (``vtc.kernels.attn_rows``),
never an L x L matrix. See docs/METHODS.md for the choices that differ from the official code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, ClassVar

import torch

from vtc import kernels
from vtc.config import MethodConfig, check_fraction, check_int
from vtc.method import (
    AttentionCall,
    HookPoint,
    LayerContext,
    Method,
    Selection,
    output_layers,
    padded_positions,
    realign,
    register_method,
)

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseVLMConfig(MethodConfig):
    """Settings of SparseVLM. One of ``budget``, ``keep_ratio``, ``schedule`` sets the counts.

    Attributes:
        budget: the paper's nominal budget (64, 96, 128, 192): the v1.5 schedule for 576 visual tokens,
            scaled to each row's visual count.
        keep_ratio: the budget as a fraction of the visual tokens (between the paper's schedules the counts
            are interpolated; 1.0 keeps everything).
        schedule: explicit visual tokens kept after each pruning layer, for 576 visual tokens (scaled).
        layers: prune the outputs of these layers; None = the paper's 2, 6, 15 of 32, scaled to the depth.
        recycle: merge part of the pruned tokens back as cluster tokens.
        recycle_ratio: share of the pruned tokens (best scored) that are clustered.
        cluster_ratio: clusters per clustered token.
        rank_adaptive: v1: keep ``int(rank(P) * rank_scale + rank_bias)`` per layer instead of a schedule.
        rank_scale, rank_bias: the v1 rule's factors; None = the official script's for the budget.
    """

    exclusive = (("budget", "keep_ratio", "schedule"),)

    budget: int | None = None
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
        chosen = [k for k in ("budget", "keep_ratio", "schedule") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"sparsevlm: set only one of budget, keep_ratio, schedule; got {', '.join(chosen)}.")
        if not chosen:
            object.__setattr__(self, "budget", 192)
        if self.budget is not None and self.budget not in SCHEDULES:
            raise ValueError(
                f"sparsevlm: budget must be one of the paper's {sorted(SCHEDULES)}; got {self.budget!r}. "
                f"Use keep_ratio for other budgets."
            )
        check_fraction("sparsevlm", "keep_ratio", self.keep_ratio, optional=True)
        if self.schedule is not None:
            for k in self.schedule:
                check_int("sparsevlm", "schedule entries", k, 0)
        if self.layers is not None:
            for layer in self.layers:
                check_int("sparsevlm", "layers entries", layer, -10_000)
            if self.schedule is not None and len(self.schedule) != len(self.layers):
                raise ValueError("sparsevlm: schedule needs one count per pruning layer.")
        check_fraction("sparsevlm", "recycle_ratio", self.recycle_ratio, closed_low=True)
        check_fraction("sparsevlm", "cluster_ratio", self.cluster_ratio)
        if self.rank_adaptive and self.budget not in RANK_RULE and None in (self.rank_scale, self.rank_bias):
            raise ValueError(
                f"sparsevlm: rank_adaptive has official factors for budgets {sorted(RANK_RULE)}; "
                f"for others set rank_scale and rank_bias."
            )


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


@register_method
class SparseVLM(Method):
    """SparseVLM: raters at the embeddings, attention taps at the pruning layers, stages after them."""

    name = "sparsevlm"
    config_cls = SparseVLMConfig
    hooks = frozenset({HookPoint.EMBEDS, HookPoint.LAYER, HookPoint.ATTENTION})
    requires = frozenset({"attn_tap"})
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
        self._initial_visual: torch.Tensor | None = None  # [B] visual tokens of the input
        self._scores: dict[int, tuple[torch.Tensor, ...]] = {}  # tapped layer -> (scores, index[, rank])

    # -- layers and counts --------------------------------------------------------------------------
    def pruned_outputs(self, num_layers: int) -> tuple[int, ...]:
        """The layers whose outputs are pruned (the stage runs at the next layer's input)."""
        return output_layers("sparsevlm", self.config.layers, PAPER_LAYERS, num_layers, REFERENCE_DEPTH)

    def bind(self, adapter) -> None:
        super().bind(adapter)
        layers = self.pruned_outputs(adapter.num_layers)
        counts = len(self._reference_schedule() or layers)
        if not self.config.rank_adaptive and counts != len(layers):
            raise ValueError(
                f"sparsevlm: {len(layers)} pruning layers but a schedule of {counts}; give one count per layer."
            )

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        # Layer 0 only reads the embeddings (raters); the stages follow the tapped layers.
        return (0, *(x + 1 for x in self.pruned_outputs(num_layers)))

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.pruned_outputs(num_layers)

    def _reference_schedule(self) -> tuple[float, ...] | None:
        c = self.config
        if c.rank_adaptive:
            return None
        if c.schedule is not None:
            return tuple(float(x) for x in c.schedule)
        if c.budget is not None:
            return tuple(float(x) for x in SCHEDULES[c.budget])
        return interpolated_schedule(c.keep_ratio)

    def _kept(self, stage: int, n_initial: torch.Tensor) -> torch.Tensor:
        """``[B]`` visual tokens a schedule keeps at `stage`, scaled from 576 to each row's visual count."""
        schedule = self._reference_schedule()
        if self.config.keep_ratio == 1.0:
            return n_initial
        return torch.round(schedule[stage] * n_initial.double() / REFERENCE_TOKENS).long()

    def _recycled(self, n_pruned: torch.Tensor) -> torch.Tensor:
        """``[B]`` cluster tokens made from `n_pruned` pruned tokens (0 when nothing was pruned)."""
        if not self.config.recycle:
            return torch.zeros_like(n_pruned)
        candidates = torch.floor(self.config.recycle_ratio * n_pruned).long() + 1
        clusters = torch.floor(candidates * self.config.cluster_ratio).long() + 1
        return torch.where(n_pruned > 0, clusters, 0)

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        if self.config.rank_adaptive:
            raise ValueError("sparsevlm: rank-adaptive counts depend on the input; measure with handle.stats.")
        num_layers = len(visual_per_layer)
        out = list(visual_per_layer)
        initial = torch.tensor([visual_per_layer[0]])
        for stage, layer in enumerate(self.pruned_outputs(num_layers)):
            before = torch.tensor([out[layer + 1]])
            kept = torch.minimum(self._kept(stage, initial), before)
            after = int((kept + self._recycled(before - kept))[0])
            out[layer + 1 :] = [after] * (num_layers - layer - 1)
        return out

    # -- hooks --------------------------------------------------------------------------------------
    def on_forward_start(self) -> None:
        self._raters, self._initial_visual, self._scores = None, None, {}

    def _rate(self, ctx: LayerContext) -> None:
        """Raters: text tokens whose embedding the visual tokens prefer (Step A of the paper)."""
        state, e = ctx.state, ctx.hidden.float()
        visual = state.visual & state.valid
        text = ~state.visual & state.valid & (visual.long().cumsum(dim=1) > 0)  # the prompt after the image
        logits = torch.einsum("bvd,btd->bvt", e, e).masked_fill(~text[:, None, :], float("-inf"))  # [B, L, L]
        relevance = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # each visual row over text columns
        relevance = (relevance * visual[..., None]).sum(dim=1) / visual.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (relevance * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
        raters = text & (relevance > mean)
        # All-equal relevance (the official code divides by zero there): every text token rates.
        self._raters = torch.where(raters.any(dim=1, keepdim=True), raters, text)
        self._initial_visual = visual.sum(dim=1)

    def on_attention(self, call: AttentionCall) -> None:
        state = call.state
        raters = self._raters.gather(1, state.index.clamp(min=0)) & (state.index >= 0)
        rows, row_valid = padded_positions(raters)
        columns, col_valid = padded_positions(state.visual & state.valid)
        if rows.shape[1] == 0 or columns.shape[1] == 0:
            return
        reduce = "none" if self.config.rank_adaptive else "mean"
        attn = call.rows(rows, columns, row_valid=row_valid, row_reduce=reduce)  # [B, S] or [B, R, S]
        if self.config.rank_adaptive:
            ranks = torch.stack([
                torch.linalg.matrix_rank(attn[b][row_valid[b]][:, col_valid[b]]) for b in range(attn.shape[0])
            ])  # fmt: skip
            attn = (attn * row_valid[..., None]).sum(dim=1) / row_valid.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            ranks = None
        scores = torch.zeros(state.index.shape, dtype=attn.dtype, device=attn.device)
        scores.scatter_(1, columns, attn * col_valid)
        self._scores[call.layer_idx] = (scores, state.index, ranks)

    def select(self, ctx: LayerContext) -> Selection | None:
        if ctx.layer_idx == 0:
            self._rate(ctx)
            return None
        tapped = ctx.layer_idx - 1
        if tapped not in self._scores:
            return None  # no rater or no visual token reached this layer's tap
        state = ctx.state
        scores, index, ranks = self._scores[tapped]
        scores = realign(scores, index, state.index)
        visual = state.visual & state.valid
        n_visual = visual.sum(dim=1)
        stage = self.pruned_outputs(ctx.adapter.num_layers).index(tapped)
        if ranks is None:
            k = self._kept(stage, self._initial_visual)
        else:
            scale, bias = self._rank_rule()
            k = torch.floor(ranks.double() * scale + bias).long()
        k = torch.minimum(k, n_visual)
        picks = kernels.topk_gather(scores, k, valid=visual)
        keep = torch.zeros_like(visual).scatter(1, picks.indices, picks.mask) & visual
        hidden = None
        if self.config.recycle and bool((visual & ~keep).any()):
            hidden, centres = self._recycle(ctx.hidden, scores, visual & ~keep)
            keep |= centres
        return Selection(keep, hidden=hidden)

    def _rank_rule(self) -> tuple[float, float]:
        c = self.config
        default = RANK_RULE.get(c.budget, (None, None))
        return (c.rank_scale if c.rank_scale is not None else default[0], c.rank_bias or default[1] or 0.0)

    def _recycle(
        self, hidden: torch.Tensor, scores: torch.Tensor, pruned: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster the best-scored pruned tokens; write each cluster's mean into its centre's slot.

        Returns the new hidden states and ``[B, L]`` the centre slots (kept as the merged tokens).
        """
        n_pruned = pruned.sum(dim=1)
        n_candidates = torch.floor(self.config.recycle_ratio * n_pruned).long() + 1
        n_clusters = self._recycled(n_pruned)
        picks = kernels.topk_gather(scores, torch.minimum(n_candidates, n_pruned), valid=pruned)
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
