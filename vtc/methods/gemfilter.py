"""GemFilter: early-layer filtering (Shi et al., arXiv 2409.17422), adapted to vision-language models.

The paper's observation is that a model's early layers already find the tokens that matter: run
layers 0..r on the whole prompt, score every token by the last token's query at layer r, keep the top
k, and run the full model on only those tokens, renumbered from 0. The scores are raw query-key logits
summed over heads and smoothed by a width-5 average pool, as in the official code; no attention matrix
and no softmax are needed, so the model keeps its sdpa / flash kernel.

In vtc the first pass is a pre-pass through the model's own layers (no KV cache written), and the
second is the model's normal forward on the kept tokens, so stock ``generate`` works and decode steps
continue the renumbered positions. See docs/METHODS.md for what vtc changes for VLMs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch

from vtc.budget import check_budget
from vtc.config import MethodConfig, check_int
from vtc.method import AttentionCall, AttentionScoredPruner, HookPoint, LayerContext, Selection, register_method
from vtc.methods.layers import resolve_layer

# The paper filters at layer 13 of LLaMA-3.1-8B's 32; without a layer, vtc takes the deepest layer at or
# before the same depth fraction (floor: 13 of 32, 11 of 28, 1 of 4), so a shallow model's pre-pass stays short.
PAPER_DEPTH = 13 / 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemFilterConfig(MethodConfig):
    """Settings of GemFilter. ``keep`` or ``keep_ratio`` set how many tokens stay (default keep 128).

    Attributes:
        layer: filter layer r (its last-token query scores the prompt); None = floor(13/32 of the depth).
        keep: visual tokens' worth kept per row: a row with Nv visual tokens drops ``Nv - keep`` tokens.
        keep_ratio: the same as a fraction of each row's visual tokens.
        scope: ``"visual"`` (the default, the VLM adaptation: only visual tokens compete; all text stays) or
            ``"all"`` (the text-LLM paper literally, preset ``gemfilter.literal``: the dropped tokens are the
            lowest-scored of the whole prompt, the last token excepted, so the question can lose words).
        positions: ``"fresh"`` (the paper: the kept tokens are renumbered 0..n-1) or ``"original"``.
        pool_kernel: width of the average pool over scores (odd).
    """

    exclusive = (("keep", "keep_ratio"),)

    layer: int | None = None
    keep: int | None = None
    keep_ratio: float | None = None
    scope: Literal["all", "visual"] = "visual"
    positions: Literal["fresh", "original"] = "fresh"
    pool_kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self, "gemfilter", default={"keep": 128})
        check_int("gemfilter", "layer", self.layer, -10_000, optional=True)
        check_int("gemfilter", "pool_kernel", self.pool_kernel, 1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"gemfilter: pool_kernel must be odd so scores stay centred; got {self.pool_kernel}.")
        if self.scope not in ("all", "visual"):
            raise ValueError(f"gemfilter: scope must be 'all' or 'visual'; got {self.scope!r}.")
        if self.positions not in ("fresh", "original"):
            raise ValueError(f"gemfilter: positions must be 'fresh' or 'original'; got {self.positions!r}.")


def last_query_scores(call: AttentionCall, pool_kernel: int) -> torch.Tensor:
    """GemFilter's scores: the last query's raw logits against every key, summed over heads, pooled.

    GQA-aware: each group of query heads meets its shared key head, which is what repeating the keys
    gives. Padding scores 0, like the zero padding a row alone gets at its start, so rows stay independent.

    Returns:
        fp32 ``[B, L]`` over the call's slots.
    """
    batch, kv_heads, length, dim = call.key.shape
    q_last = call.query[:, :, -1].float().view(batch, kv_heads, -1, dim)  # [B, Hq, D] -> [B, Hkv, group, D]
    logits = torch.einsum("bhgd,bhld->bl", q_last, call.key[:, :, -length:].float())  # [B, L]
    logits = logits.masked_fill(~call.state.valid, 0.0)
    pooled = torch.nn.functional.avg_pool1d(
        logits[:, None], pool_kernel, stride=1, padding=pool_kernel // 2, count_include_pad=True
    )  # [B, 1, L]
    return pooled[:, 0]


@register_method
class GemFilter(AttentionScoredPruner):
    """GemFilter as a pre-pass to layer r and a stage at the embeddings (EMBEDS) of the real forward."""

    name = "gemfilter"
    config_cls = GemFilterConfig
    # Both passes run inside the prefill, so generate (and any decoding method) works unchanged.
    hooks = frozenset({HookPoint.EMBEDS, HookPoint.ATTENTION})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"keep": 192},
        "r128": {"keep": 128},
        "r64": {"keep": 64},
        "literal": {"scope": "all"},  # the text-LLM paper's scope: the whole prompt competes
        "noop": {"keep_ratio": 1.0},
    }

    config: GemFilterConfig

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.filter_layer(adapter.num_layers)  # validates the layer against this model

    def filter_layer(self, num_layers: int) -> int:
        layer = self.config.layer if self.config.layer is not None else int(PAPER_DEPTH * num_layers)
        return resolve_layer("gemfilter", "layer", layer, num_layers)

    # The pre-pass taps layer r and the stage prunes the real forward's input; keep_ratio 1.0 can never
    # drop a token, so nothing runs then (not even the pre-pass). A `keep` of at least every row's visual
    # tokens is found per forward (`needs_prepass`), and then neither the pre-pass nor the stage runs.
    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return () if self.budget.keeps_everything else (0,)

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return () if self.budget.keeps_everything else (self.filter_layer(num_layers),)

    def prepass_layer(self, num_layers: int) -> int | None:
        return None if self.budget.keeps_everything else self.filter_layer(num_layers)

    def _drops(self, state) -> torch.Tensor:
        """``[B]`` tokens each row drops: its visual tokens less what the budget keeps of them."""
        n_visual = state.num_visual()
        return n_visual - self.budget.resolve(n_visual)

    def needs_prepass(self, state) -> bool:
        return bool((self._drops(state) > 0).any())

    def tapped_for(self, layer_idx: int) -> int:
        return self.filter_layer(self.adapter.num_layers)

    def tap(self, call: AttentionCall) -> torch.Tensor:
        return last_query_scores(call, self.config.pool_kernel)

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        kept = int(self.budget.resolve(torch.tensor([visual_per_layer[0]]))[0])
        return [kept] * len(visual_per_layer)  # scope "all" drops as many tokens, from anywhere

    # -- the stage: the template's top-k, with the whole prompt competing in scope "all" ------------------
    def candidates(self, ctx: LayerContext) -> torch.Tensor:
        state = ctx.state
        return state.visual & state.valid if self.config.scope == "visual" else state.valid

    def num_keep(self, ctx: LayerContext, present: torch.Tensor) -> torch.Tensor:
        # A row drops as many tokens as its visual budget removes, from whatever competes.
        return present - self._drops(ctx.state)[:, None]  # [B, 1]

    def select(self, ctx: LayerContext) -> Selection | torch.Tensor | None:
        return super().select(ctx) if self.needs_prepass(ctx.state) else None  # nothing to drop: no pre-pass ran

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = super().score(ctx)
        if self.config.scope == "all":  # the prompt's last token predicts the next one: it always stays
            scores = scores.clone()
            scores[:, -1] = float("inf")
        return scores

    def finish(self, ctx: LayerContext, scores: torch.Tensor, keep: torch.Tensor) -> Selection:
        if self.config.scope == "all":
            keep = keep | ~ctx.state.valid  # padding stays padding
        return Selection(keep, scope=self.config.scope, positions=self.config.positions)
