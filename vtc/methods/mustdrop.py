"""MustDrop (Liu et al., arXiv 2411.10803): drop visual tokens at every stage of the model's life.

Three stages, each switchable: (1) vision: after the tower's first layer, 3 x 3 windows of nearly
identical patches (mean pairwise cosine >= 0.8) merge into one token, and the *key set*, the 8% of
patches the CLS token attends to most in the tower's last layer, is protected from every later drop;
(2) prefill: after LLM layers 2, 6, 10, 14 a "dual attention" filter drops a visual token when the
text's total attention to it is small (below tau_g of the total) and no text token attends to it much
(max below tau_i), so counts vary per sample; (3) decode: the KV caches of the layers from the first
filter on keep only the tokens that reached the end ("output-aware" cache). See docs/METHODS.md for
where each stage sits on each model family and what differs from the official code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from vtc.config import MethodConfig, check_fraction, check_int, check_layers
from vtc.method import (
    AttentionCall,
    AttentionScoredPruner,
    HookPoint,
    LayerContext,
    Selection,
    VisionContext,
    register_method,
)
from vtc.methods.attention import text_after_image, visual_attention
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
        key_ratio: share of the patches in the key set (rounded up).
        filter: run the dual-attention filter in the LLM.
        layers: filter after these LLM layers; None = the paper's 2, 6, 10, 14 of 32, scaled to the depth.
        global_threshold: tau_g: drop if the text's total attention is below tau_g of all visual tokens'...
        individual_threshold: tau_i: ...and no text token's attention (head mean) reaches tau_i.
        cache_trim: after the prefill, layers from the first filter on cache only the final tokens.
    """

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge not in ("auto", "tower", "embeddings", "off"):
            raise ValueError(f"mustdrop: merge must be 'auto', 'tower', 'embeddings' or 'off'; got {self.merge!r}.")
        check_int("mustdrop", "merge_window", self.merge_window, 2)
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"mustdrop: merge_threshold is a cosine in [-1, 1]; got {self.merge_threshold!r}.")
        check_int("mustdrop", "merge_after", self.merge_after, 0)
        check_fraction("mustdrop", "key_ratio", self.key_ratio)
        for name in ("global_threshold", "individual_threshold"):
            check_fraction("mustdrop", name, getattr(self, name), closed_low=True)
        check_layers("mustdrop", self.layers)


@register_method
class MustDrop(AttentionScoredPruner):
    """MustDrop: a vision stage, LLM filter stages on attention taps, and a cache trim after prefill."""

    name = "mustdrop"
    config_cls = MustDropConfig
    hooks = frozenset({HookPoint.VISION, HookPoint.EMBEDS, HookPoint.LAYER, HookPoint.ATTENTION, HookPoint.CACHE})
    fixed_counts = False  # thresholds: how many tokens go depends on the input
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"global_threshold": 0.001, "individual_threshold": 0.001},
        "r128": {"global_threshold": 0.0012, "individual_threshold": 0.001},
        "r64": {"global_threshold": 0.011, "individual_threshold": 0.01},
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
        at_input = (0,) if self.merge_at != "off" or self.use_key_set else ()
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
        raise ValueError("mustdrop drops a data-dependent number of tokens; measure it with handle.stats.")

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
        # token attends much; how many go depends on the input.
        state = ctx.state
        g, m = scores.unbind(dim=-1)  # [B, L, 2] -> [B, L] each
        visual = state.visual & state.valid
        total = (g * visual).sum(dim=1, keepdim=True)
        drop = visual & (g < self.config.global_threshold * total) & (m < self.config.individual_threshold)
        if self._keys is not None:
            drop &= ~self._keys.gather(1, state.index.clamp(min=0))  # the key set is never dropped
        return visual & ~drop

    def select(self, ctx: LayerContext) -> Selection | torch.Tensor | None:
        if ctx.layer_idx > 0:
            return super().select(ctx)
        # Layer 0: drop what the tower merged away (or merge here), and place the key set. The tower ran
        # for this prefill's images (in generate: just before it); its results are used once.
        state = ctx.state
        tower_keys, tower_gone, self._tower_keys, self._tower_gone = self._tower_keys, self._tower_gone, None, None
        if self.use_key_set and tower_keys is not None:
            self._keys = tower_to_llm(tower_keys, state, self.adapter.vision_has_cls)
        if self.merge_at == "embeddings":
            return merge_grids(ctx, self.config.merge_window, self.config.merge_threshold)
        if self.merge_at == "tower" and tower_gone is not None:
            return Selection(state.visual & state.valid & ~tower_to_llm(tower_gone, state, self.adapter.vision_has_cls))
        return None
