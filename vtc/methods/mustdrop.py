"""MustDrop (Liu et al., arXiv 2411.10803): drop visual tokens at every stage of the model's life.

Three stages, each switchable:

1. Vision. After the tower's first layer, 3 x 3 windows of patches whose features are nearly identical
   (mean pairwise cosine >= 0.8) merge into one token; and a *key set*, the patches the CLS token
   attends to most in the tower's last layer (8%), is protected from every later drop.
2. Prefill. After LLM layers 2, 6, 10, 14 a "dual attention" filter drops a visual token when both the
   text's total attention to it is small (below tau_g of the total) and no text token attends to it
   much (max below tau_i). Counts vary per sample.
3. Decode. After the prefill, the KV caches of the layers from the first filter on keep only the tokens
   that survived to the end ("output-aware" cache).

See docs/METHODS.md for where vtc places each stage on each model family and what differs from the
official code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from vtc import kernels
from vtc.config import MethodConfig, check_fraction, check_int
from vtc.errors import MissingCapabilityError
from vtc.method import (
    AttentionCall,
    HookPoint,
    LayerContext,
    Method,
    Selection,
    VisionContext,
    output_layers,
    padded_positions,
    realign,
    register_method,
)

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
        if self.layers is not None:
            for layer in self.layers:
                check_int("mustdrop", "layers entries", layer, -10_000)


def merge_windows(
    feats: torch.Tensor, windows: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the windows whose tokens are nearly identical.

    Args:
        feats: ``[n, d]`` token features.
        windows: ``[W, w*w]`` token indices of each complete window, in raster order.
        threshold: merge when the mean cosine similarity over ordered pairs of distinct tokens is at least this.

    Returns:
        ``feats`` with each merged window's mean written into its last (bottom-right) token, ``[n]`` the
        tokens merged away (the window's other tokens), and ``[W]`` the windows' scores.
    """
    n_win, size = windows.shape
    if n_win == 0:
        return feats, torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device), feats.new_zeros(0)
    members = feats[windows].float()  # [W, w*w, d]
    unit = members / members.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    cos = unit @ unit.transpose(1, 2)  # [W, w*w, w*w]
    score = (cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)) / (size * (size - 1))
    merged = score >= threshold
    out = feats.clone()
    out[windows[merged, -1]] = members[merged].mean(dim=1).to(feats.dtype)  # plain mean: all sizes are 1
    gone = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    gone[windows[merged, :-1].flatten()] = True
    return out, gone, score


def grid_windows(rows: int, cols: int, side: int) -> torch.Tensor:
    """``[W, side*side]`` raster indices (into a rows x cols grid) of the complete side x side windows."""
    out = []
    for r0 in range(0, rows - side + 1, side):
        for c0 in range(0, cols - side + 1, side):
            out.append([(r0 + r) * cols + c0 + c for r in range(side) for c in range(side)])
    return torch.tensor(out, dtype=torch.long).reshape(-1, side * side)


@register_method
class MustDrop(Method):
    """MustDrop: a vision stage, LLM filter stages on attention taps, and a cache trim after prefill."""

    name = "mustdrop"
    config_cls = MustDropConfig
    hooks = frozenset({HookPoint.VISION, HookPoint.EMBEDS, HookPoint.LAYER, HookPoint.ATTENTION, HookPoint.CACHE})
    requires = frozenset({"attn_tap"})
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
        self._attention: dict[int, tuple[torch.Tensor, ...]] = {}

    def bind(self, adapter) -> None:
        super().bind(adapter)
        c, caps = self.config, adapter.capabilities
        if c.merge == "auto":
            self.merge_at = "tower" if "vision_stage" in caps else "embeddings"
        if self.merge_at == "tower" and "vision_stage" not in caps:
            raise MissingCapabilityError(
                f"mustdrop: merge='tower' needs stages inside the vision tower, which the {adapter.name!r} "
                f"adapter does not provide; use merge='embeddings' (or 'auto')."
            )
        self.use_key_set = "vision_cls_attn" in caps if c.key_set is None else c.key_set
        if self.use_key_set and "vision_cls_attn" not in caps:
            raise MissingCapabilityError(
                f"mustdrop: the key set needs the vision tower's CLS attention, which the {adapter.name!r} "
                f"adapter does not provide (its tower has no CLS token); set key_set=False."
            )
        self.filter_layers(adapter.num_layers)

    # -- where it acts ------------------------------------------------------------------------------
    def filter_layers(self, num_layers: int) -> tuple[int, ...]:
        """LLM layers whose outputs the dual-attention filter prunes."""
        if not self.config.filter:
            return ()
        return output_layers("mustdrop", self.config.layers, PAPER_LAYERS, num_layers, REFERENCE_DEPTH)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        at_input = (0,) if self.merge_at != "off" or self.use_key_set else ()
        return (*at_input, *(x + 1 for x in self.filter_layers(num_layers)))

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.filter_layers(num_layers)

    def cache_trim_from(self, num_layers: int) -> int | None:
        layers = self.filter_layers(num_layers)
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
        grid, offset = ctx.grid, 1 if ctx.has_cls else 0
        windows = grid_windows(grid, grid, self.config.merge_window).to(ctx.hidden.device) + offset
        hidden, keep = ctx.hidden.clone(), ctx.valid.clone()
        for i in range(hidden.shape[0]):  # each image merges its own windows (the paper: min over a batch)
            hidden[i], gone, _ = merge_windows(hidden[i], windows, self.config.merge_threshold)
            keep[i] &= ~gone
        self._tower_gone = ~keep[:, offset:]
        return Selection(keep, hidden=hidden)

    def on_vision_attention(self, call: AttentionCall) -> None:
        # The CLS row over the patches still present, mean over heads; the top share is the key set.
        patches = call.state.visual & call.state.valid
        columns, col_valid = padded_positions(patches)
        rows = torch.zeros(call.query.shape[0], 1, dtype=torch.long, device=columns.device)
        cls = call.rows(rows, columns)  # [N, S]
        k = torch.ceil(self.config.key_ratio * col_valid.sum(dim=1).double()).long()
        picks = kernels.topk_gather(cls.masked_fill(~col_valid, float("-inf")), k, valid=col_valid)
        keys = torch.zeros_like(patches)
        keys.scatter_(1, columns.gather(1, picks.indices), picks.mask)
        self._tower_keys = keys[:, 1:]  # drop the CLS column: patch order

    # -- LLM ----------------------------------------------------------------------------------------
    def on_forward_start(self) -> None:
        self._keys, self._attention = None, {}

    def _from_tower(self, tower: torch.Tensor, state) -> torch.Tensor:
        """Per-patch values of all images in the batch, onto the LLM's visual tokens (row-major order)."""
        visual = state.visual & state.valid
        if int(visual.sum()) != tower.numel():
            raise ValueError(
                f"mustdrop: the vision tower saw {tower.numel()} patches but the prompt has {int(visual.sum())} "
                f"image tokens; merge='tower' and the key set need one placeholder per patch (batch the images "
                f"with their prompts; beam search is not supported with merge='tower')."
            )
        out = torch.zeros_like(visual)
        out[visual] = tower.flatten().to(out.device)
        return out

    def _merge_embeddings(self, ctx: LayerContext) -> Selection:
        """The window merge on the LLM's visual tokens, windows taken per image and frame from the grid."""
        state, side = ctx.state, self.config.merge_window
        hidden, keep = ctx.hidden.clone(), state.visual & state.valid
        for b in range(hidden.shape[0]):
            for members, rows, cols in list(state.grids(b, keep[b])):
                windows = members[grid_windows(rows, cols, side).to(members.device)]
                hidden[b], gone, _ = merge_windows(hidden[b], windows, self.config.merge_threshold)
                keep[b] &= ~gone
        return Selection(keep, hidden=hidden)

    def on_attention(self, call: AttentionCall) -> None:
        state = call.state
        visual = state.visual & state.valid
        text = ~state.visual & state.valid & (visual.long().cumsum(dim=1) > 0)  # the prompt after the image
        rows, row_valid = padded_positions(text)
        columns, _ = padded_positions(visual)
        if rows.shape[1] == 0 or columns.shape[1] == 0:
            return
        total = call.rows(rows, columns, row_valid=row_valid, row_reduce="sum")  # g: global attention
        peak = call.rows(rows, columns, row_valid=row_valid, row_reduce="max")  # m: individual attention
        g = torch.zeros(state.index.shape, dtype=total.dtype, device=total.device).scatter(1, columns, total)
        m = torch.zeros_like(g).scatter(1, columns, peak)
        self._attention[call.layer_idx] = (g, m, state.index)

    def select(self, ctx: LayerContext) -> Selection | None:
        state = ctx.state
        if ctx.layer_idx == 0:
            return self._at_input(ctx)
        tapped = ctx.layer_idx - 1
        if tapped not in self._attention:
            return None
        g, m, index = self._attention[tapped]
        g, m = realign(g, index, state.index), realign(m, index, state.index)
        visual = state.visual & state.valid
        total = (g * visual).sum(dim=1, keepdim=True)
        drop = visual & (g < self.config.global_threshold * total) & (m < self.config.individual_threshold)
        if self._keys is not None:
            drop &= ~self._keys.gather(1, state.index.clamp(min=0))  # the key set is never dropped
        return Selection(visual & ~drop)

    def _at_input(self, ctx: LayerContext) -> Selection | None:
        """Layer 0: drop what the tower merged away (or merge here), and place the key set."""
        state = ctx.state
        # The tower ran for this prefill's images (in generate: just before it); use its results once.
        tower_keys, tower_gone, self._tower_keys, self._tower_gone = self._tower_keys, self._tower_gone, None, None
        if self.use_key_set and tower_keys is not None:
            self._keys = self._from_tower(tower_keys, state)
        if self.merge_at == "embeddings":
            return self._merge_embeddings(ctx)
        if self.merge_at == "tower" and tower_gone is not None:
            return Selection(state.visual & state.valid & ~self._from_tower(tower_gone, state))
        return None
