"""MustDrop (Liu et al., arXiv 2411.10803): drop visual tokens at every stage of the model's life.

(1) Vision: 3 x 3 windows of nearly identical tower patches merge, and the CLS token's most attended 8%
(the *key set*) is protected; (2) prefill: after LLM layers 2, 6, 10, 14 (of 32) the dual-attention rule
drops visual tokens the text barely attends to, by thresholds or at a budget (``vtc.methods.dual``);
(3) decode: layers from the first filter on cache only the final tokens. See docs/METHODS.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from vtc.budget import check_budget
from vtc.config import MethodConfig
from vtc.contexts import AttentionCall, LayerContext, Selection, VisionContext
from vtc.method import AttentionScoredPruner, HookPoint, register_method
from vtc.methods.attention import text_after_image, visual_attention
from vtc.methods.dual import check_settings, dual_keep, planned_counts, stage_counts
from vtc.methods.layers import output_layers
from vtc.methods.tower import cls_key_set, merge_tower_windows, place_tower_stages, tower_to_llm
from vtc.methods.windows import merge_grids

PAPER_LAYERS, REFERENCE_DEPTH = (2, 6, 10, 14), 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class MustDropConfig(MethodConfig):
    """Settings of MustDrop.

    Attributes:
        merge: where similar windows merge: ``"tower"`` (after the vision tower's layer `merge_after`, as
            the paper), ``"embeddings"`` (on the LLM's visual tokens, for towers without CLS), ``"auto"``
            (the tower where the family supports it) or ``"off"``.
        merge_window: window side in patches.
        merge_threshold: a window merges when its mean pairwise cosine similarity is at least this.
        merge_after: the tower layer whose output is merged.
        key_set: protect the CLS token's most attended patches; None = where the tower has a CLS token.
        key_ratio: share of the patches in the key set (rounded up). filter: run the LLM's filter.
        layers: filter after these LLM layers; None = the paper's 2, 6, 10, 14 of 32, scaled to the depth.
        global_threshold, individual_threshold: tau_g, tau_i: drop if the text's total attention is below
            tau_g of all visual tokens' and no text token's attention (head mean) reaches tau_i.
        keep, keep_ratio: a budget instead: N (or a share) of each row's visual tokens after the last filter
            stage, earlier stages stepping down geometrically; each stage scales both thresholds per row.
        cache_trim: after the prefill, layers from the first filter on cache only the final tokens.
    """

    exclusive = (("keep", "keep_ratio"),)

    merge: Literal["auto", "tower", "embeddings", "off"] = "auto"
    merge_window: int = 3
    merge_threshold: float = 0.8
    merge_after: int = 0
    key_set: bool | None = None
    key_ratio: float = 0.08
    filter: bool = True
    layers: tuple[int, ...] | None = None
    global_threshold: float = 0.001
    individual_threshold: float = 0.001
    cache_trim: bool = True
    keep: int | None = None
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self, "mustdrop", default={})  # no budget: the thresholds decide
        if not self.filter and (self.keep, self.keep_ratio) != (None, None):
            raise ValueError("mustdrop: keep / keep_ratio budget the LLM filter; set filter=True.")
        check_settings(self)


@register_method
class MustDrop(AttentionScoredPruner):
    """MustDrop: a vision stage, LLM filter stages on attention taps, and a cache trim after prefill."""

    name = "mustdrop"
    config_cls = MustDropConfig
    hooks = frozenset({HookPoint.VISION, HookPoint.EMBEDS, HookPoint.LAYER, HookPoint.ATTENTION, HookPoint.CACHE})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"keep": 192},  # the budgets every pruner shares
        "r128": {"keep": 128},
        "r64": {"keep": 64},
        "t192": {"global_threshold": 0.001, "individual_threshold": 0.001},  # the official scripts' thresholds
        "t128": {"global_threshold": 0.0012, "individual_threshold": 0.001},
        "t64": {"global_threshold": 0.011, "individual_threshold": 0.01},
        "noop": {"merge": "off", "key_set": False, "filter": False, "cache_trim": False},
    }

    config: MustDropConfig

    def __init__(self, config: MustDropConfig) -> None:
        super().__init__(config)
        self.merge_at = config.merge
        self.use_key_set = bool(config.key_set)
        self._tower_gone: torch.Tensor | None = None  # [N images, patches] merged away in the tower
        self._tower_keys: torch.Tensor | None = None  # [N images, patches] key set
        self._keys: torch.Tensor | None = None  # [B, L_input] key set as input positions
        self._initial: torch.Tensor | None = None  # [B] visual tokens of the input (budget mode)
        self.budgeted = (config.keep, config.keep_ratio) != (None, None)

    @property
    def fixed_counts(self) -> bool:  # type: ignore[override]
        return self.budgeted and self.merge_at == "off"  # thresholds and window merges depend on the input

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.merge_at, self.use_key_set = place_tower_stages(
            "mustdrop", self.config.merge, self.config.key_set, adapter
        )
        self.scored_layers(adapter.num_layers)

    # -- where it acts ------------------------------------------------------------------------------
    def scored_layers(self, num_layers: int) -> tuple[int, ...]:
        """LLM layers whose outputs the dual-attention filter prunes."""
        if not self.config.filter:
            return ()
        return output_layers("mustdrop", self.config.layers, PAPER_LAYERS, num_layers, REFERENCE_DEPTH)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        at_input = (0,) if self.merge_at != "off" or self.use_key_set or self.budgeted else ()
        return (*at_input, *super().prune_layers(num_layers))

    def cache_trim_from(self, num_layers: int) -> int | None:
        layers = self.scored_layers(num_layers)
        return layers[0] if layers and self.config.cache_trim else None

    def vision_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.merge_at != "tower":
            return ()
        layer = self.config.merge_after + 1
        if layer >= num_layers:
            raise ValueError(f"mustdrop: merge_after={self.config.merge_after} leaves no tower layer after it.")
        return (layer,)

    def vision_tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return (num_layers - 1,) if self.use_key_set else ()

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        if not self.budgeted or self.merge_at != "off":
            raise ValueError(
                "mustdrop drops a data-dependent number of tokens (its thresholds, its window merge); plan it "
                "with keep= and merge='off', or measure it with handle.stats."
            )
        return planned_counts(visual_per_layer, self.scored_layers(len(visual_per_layer)), self.budget.resolve)

    # -- vision tower -------------------------------------------------------------------------------
    def on_vision_start(self) -> None:
        self._tower_gone = self._tower_keys = None

    def vision_select(self, ctx: VisionContext) -> Selection:
        selection, self._tower_gone = merge_tower_windows(ctx, self.config.merge_window, self.config.merge_threshold)
        return selection

    def on_vision_attention(self, call: AttentionCall) -> None:
        self._tower_keys = cls_key_set(call, self.config.key_ratio)

    # -- LLM ----------------------------------------------------------------------------------------
    def on_forward_start(self) -> None:
        super().on_forward_start()
        self._keys = None

    def tap(self, call: AttentionCall) -> torch.Tensor | None:
        text = text_after_image(call.state)
        total = visual_attention(call, text, row_reduce="sum")  # g: the text's global attention
        if total is None:
            return None
        peak = visual_attention(call, text, row_reduce="max")  # m: the text's individual attention
        return torch.stack([total, peak], dim=-1)  # [B, L, 2]

    def choose(self, ctx: LayerContext, scores: torch.Tensor) -> torch.Tensor:
        # The dual rule instead of a top-k: drop where the text's total attention is small *and* no text
        # token attends much; how many go depends on the input, unless a budget scales the thresholds.
        state, c, k = ctx.state, self.config, None
        keys = self._keys.gather(1, state.index.clamp(min=0)) if self._keys is not None else None
        if self.budgeted:
            layers = self.scored_layers(ctx.adapter.num_layers)
            counts = stage_counts(self._initial, self.budget.resolve(self._initial), len(layers))
            k = counts[layers.index(self.tapped_for(ctx.layer_idx))]
        return dual_keep(scores, state.visual & state.valid, keys, c.global_threshold, c.individual_threshold, k)

    def select(self, ctx: LayerContext) -> Selection | torch.Tensor | None:
        if ctx.layer_idx > 0:
            return super().select(ctx)
        # Layer 0: drop what the tower merged away (or merge here), and place the key set. The tower ran
        # for this prefill's images (in generate: just before it); its results are used once.
        state = ctx.state
        self._initial = state.num_visual()
        tower_keys, tower_gone, self._tower_keys, self._tower_gone = self._tower_keys, self._tower_gone, None, None
        if self.use_key_set and tower_keys is not None:
            self._keys = tower_to_llm(tower_keys, state, self.adapter.vision_has_cls)
        if self.merge_at == "embeddings":
            return merge_grids(ctx, self.config.merge_window, self.config.merge_threshold)
        if self.merge_at == "tower" and tower_gone is not None:
            return Selection(state.visual & state.valid & ~tower_to_llm(tower_gone, state, self.adapter.vision_has_cls))
        return None
