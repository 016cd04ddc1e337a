"""DART: Duplication-Aware Reduction of Tokens (Wen et al., EMNLP 2025, arXiv 2502.11494).

Visual tokens that duplicate others carry little; DART keeps the ones least similar to a few pivots.
At the input of decoder layer K (default 2), pivots are the visual and text tokens whose layer-(K-1)
keys have the largest L1 norm. For each pivot in turn, DART picks the still-unpicked visual tokens with
the lowest cosine similarity to it, on hidden states passed through the model's final norm. The kept
visual set is the image pivots plus all picks; text is never pruned, and the kept tokens keep their
original positions. DART needs no attention weights, so the model keeps its sdpa / flash kernels.

Deviation from the official code (see docs/METHODS.md): pivots are processed in ascending position
order; the official code iterates a Python set, whose order is arbitrary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from vtc import kernels
from vtc.budget import Budget, Scope, check_budget
from vtc.config import MethodConfig, check_int
from vtc.method import AttentionCall, HookPoint, LayerContext, Method, realign, register_method
from vtc.methods.layers import resolve_layer


@dataclasses.dataclass(frozen=True, kw_only=True)
class DARTConfig(MethodConfig):
    """Settings of DART. Exactly one of ``budget``, ``keep``, ``keep_ratio`` sets how many tokens stay.

    Attributes:
        layer: decoder layer K whose input is pruned (keys come from layer K-1); 1 <= K < layers.
        budget: the paper's budget B: every pivot picks ``B // pivots`` tokens, so ``4 + 8 * (B // 8)``
            visual tokens stay with the default 4 + 4 pivots (196 / 132 / 68 for 192 / 128 / 64).
        keep: keep exactly this many visual tokens per image row (all of them when a row has fewer).
        keep_ratio: keep this fraction of each row's visual tokens (rounded down, at least the pivots).
        pivot_image_tokens: visual pivots, always kept.
        pivot_text_tokens: text pivots (from the tokens after the first visual token).
        budget_scope: the unit the budget applies to (``vtc.budget.Scope``): ``"row"`` (the paper),
            ``"image"``, ``"frame"`` or ``"crop"``; each unit then picks its own image pivots and
            duplicates among its own tokens (text pivots are the row's), which on video is DART per frame.
    """

    exclusive = (("budget", "keep", "keep_ratio"),)

    layer: int = 2
    budget: int | None = None
    keep: int | None = None
    keep_ratio: float | None = None
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    budget_scope: Scope = "row"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("dart", "layer", self.layer, -10_000)
        if self.layer == 0:
            raise ValueError("dart: layer must be at least 1, since the pivots use layer K-1's keys; got 0.")
        check_int("dart", "pivot_image_tokens", self.pivot_image_tokens, 0)
        check_int("dart", "pivot_text_tokens", self.pivot_text_tokens, 0)
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            raise ValueError("dart: at least one pivot is needed (pivot_image_tokens + pivot_text_tokens >= 1).")
        check_budget(self, "dart", default={"budget": 128}, min_keep=self.pivot_image_tokens)  # 128: the headline


@register_method
class DART(Method):
    """DART at the input of one decoder layer (LAYER hook), with an attention tap on the layer before."""

    name = "dart"
    config_cls = DARTConfig
    hooks = frozenset({HookPoint.LAYER, HookPoint.ATTENTION})
    requires = frozenset({"attn_tap", "final_norm"})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"budget": 192},
        "r128": {"budget": 128},
        "r64": {"budget": 64},
        "noop": {"keep_ratio": 1.0},
    }

    config: DARTConfig

    def __init__(self, config: DARTConfig) -> None:
        super().__init__(config)
        self.budget = Budget.of(config)
        self._key_norms: tuple[torch.Tensor, torch.Tensor] | None = None  # (norms, input positions)

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.prune_layers(adapter.num_layers)  # validates the layer against this model

    @property
    def fixed_counts(self) -> bool:  # type: ignore[override]
        return self.budget.scope == "row"  # per image or frame, the counts depend on each row's media

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return (resolve_layer("dart", "layer", self.config.layer, num_layers, lo=1),)

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.prune_layers(num_layers)[0] - 1,)

    def on_forward_start(self) -> None:
        self._key_norms = None

    def on_attention(self, call: AttentionCall) -> None:
        # L1 norm of each token's keys over all heads. Repeating KV heads for GQA (as the official code
        # does) multiplies every norm by the same factor, so the ranking is the same without the copy.
        norms = call.key[:, :, -call.query.shape[2] :].float().abs().sum(dim=(1, 3))  # [B, Hkv, L, D] -> [B, L]
        self._key_norms = (norms, call.state.index)

    def _norms_for(self, index: torch.Tensor) -> torch.Tensor:
        """Key norms of the tokens at input positions `index` (``[B, L]``, ascending)."""
        if self._key_norms is None:
            raise RuntimeError(
                "dart: the layer before the pruning layer did not report its keys in this forward; "
                "vtc's attention tap was bypassed (was the attention implementation changed after wrapping?)."
            )
        return realign(*self._key_norms, index)

    # -- budgets ----------------------------------------------------------------------------------
    def _per_pivot(self) -> int:
        """Picks per pivot in budget mode: the paper's ``budget // (image + text pivots)``."""
        return self.config.budget // (self.config.pivot_image_tokens + self.config.pivot_text_tokens)

    def _targets(self, n_visual: torch.Tensor, n_image_pivots: torch.Tensor, n_pivots: torch.Tensor) -> torch.Tensor:
        """``[B]`` visual tokens to keep, image pivots included, capped at the ``[B]`` visual tokens present.

        The paper's budget B gives each pivot ``B // (image + text pivots)`` picks, so the count depends on
        how many pivots a row has; ``keep_ratio`` never keeps fewer than the image pivots.
        """

        def paper(n: torch.Tensor) -> torch.Tensor:
            return n_image_pivots + n_pivots * self._per_pivot()

        return self.budget.resolve(n_visual, paper=paper, at_least=n_image_pivots)

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        if self.budget.scope != "row":
            raise ValueError("dart: per-unit counts depend on the images and frames; measure them with handle.stats.")
        k = self.prune_layers(len(visual_per_layer))[0]
        n = torch.tensor([visual_per_layer[k]])
        image_pivots = n.clamp(max=self.config.pivot_image_tokens)
        text_pivots = min(text_tokens, self.config.pivot_text_tokens) * int(n[0] > 0)
        kept = int(self._targets(n, image_pivots, image_pivots + text_pivots)[0])
        return visual_per_layer[:k] + [kept] * (len(visual_per_layer) - k)

    # -- selection --------------------------------------------------------------------------------
    def select(self, ctx: LayerContext) -> torch.Tensor:
        state = ctx.state
        visual = state.visual & state.valid
        # Text pivots come from the prompt after the first visual token (question and template).
        after_first = visual.long().cumsum(dim=1) > 0
        text = ~state.visual & state.valid & after_first
        text = torch.where(text.any(dim=1, keepdim=True), text, ~state.visual & state.valid)
        norms = self._norms_for(state.index)
        z = ctx.adapter.final_norm(ctx.hidden)  # [B, L, d]
        if self.budget.scope == "row":
            return self._select_unit(visual, text, norms, z)
        units = self.budget.units(state)
        keep = torch.zeros_like(visual)
        for g in range(int(units[visual].max()) + 1 if bool(visual.any()) else 0):
            keep |= self._select_unit(visual & (units == g), text, norms, z)
        return keep

    def _select_unit(
        self, visual: torch.Tensor, text: torch.Tensor, norms: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """DART among the `visual` slots ``[B, L]`` of one unit per row: the kept ones among them."""
        c = self.config
        n_visual = visual.sum(dim=1)  # [B]
        k_img = n_visual.clamp(max=c.pivot_image_tokens)
        k_txt = text.sum(dim=1).clamp(max=c.pivot_text_tokens) * (n_visual > 0)
        target = self._targets(n_visual, k_img, k_img + k_txt)
        prune = target < n_visual  # [B] rows that drop anything
        if not bool(prune.any()):
            return visual
        img_piv = kernels.topk_gather(norms, k_img, valid=visual)
        txt_piv = kernels.topk_gather(norms, k_txt, valid=text)

        # All pivots of a row in ascending position order (the official order is Python set order).
        pos = torch.cat([img_piv.indices, txt_piv.indices], dim=1)  # [B, P]
        used = torch.cat([img_piv.mask, txt_piv.mask], dim=1)
        order = torch.sort(torch.where(used, pos, visual.shape[1]), dim=1, stable=True).indices
        pos, used = pos.gather(1, order), used.gather(1, order)

        if c.budget is not None:
            counts = torch.where(used, self._per_pivot(), 0)
        else:  # share target - image pivots among the row's pivots; the first ones take the remainder
            n_piv = used.sum(dim=1, keepdim=True).clamp(min=1)
            picks = (target - k_img)[:, None]
            rank = torch.arange(pos.shape[1], device=pos.device)
            counts = torch.where(used, picks // n_piv + (rank < picks % n_piv).long(), 0)

        pivot_feats = z.gather(1, pos[..., None].expand(-1, -1, z.shape[-1])) * used[..., None]  # [B, P, d]
        image_pivots = torch.zeros_like(visual).scatter(1, img_piv.indices, img_piv.mask)
        picked = kernels.dup_select(z, pivot_feats, counts, visual & ~image_pivots)
        keep_all = visual & ~prune[:, None]  # rows with no more visual tokens than the budget
        return image_pivots | picked | keep_all
