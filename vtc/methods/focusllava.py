"""FocusLLaVA, training-free approximation (after Zhu et al., arXiv 2411.14228).

FocusLLaVA trains two samplers with the model and published no code: a vision-guided sampler that
gives low-information regions fewer tokens (choosing per region among pooled versions of the feature
map), and a text-guided sampler that keeps the visual tokens the instruction attends to. vtc cannot
reproduce the trained samplers. This method is a training-free stand-in, and its numbers are not the
paper's:

* vision-guided (at the LLM input): each 4 x 4 region of an image's token grid whose tokens are nearly
  identical (mean pairwise cosine at least `redundancy`) becomes one token; otherwise each of its 2 x 2
  windows that is redundant becomes one token; the rest stay as they are;
* text-guided (after an LLM layer): the instruction's attention to each visual token (softmax rows of
  that layer, mean over heads and instruction tokens) ranks them, and the top `keep` stay.

Both are registered samplers (``SAMPLERS``); ``FocusLLaVAConfig.vision_sampler`` / ``text_sampler`` and
``sampler_weights`` are where trained samplers would plug in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from vtc.budget import Budget, Scope, check_budget
from vtc.config import MethodConfig, check_int
from vtc.errors import UnknownMethodError
from vtc.method import AttentionCall, AttentionScoredPruner, HookPoint, LayerContext, Selection, register_method
from vtc.methods.attention import text_after_image, visual_attention
from vtc.methods.layers import resolve_layer
from vtc.methods.windows import grid_windows, merge_windows
from vtc.registry import Registry

#: Samplers by name. A vision sampler maps (method, LayerContext) -> Selection at the LLM input; a text
#: sampler maps (method, AttentionCall) -> [B, L] scores of the current slots (higher = keep).
SAMPLERS: Registry[Callable[..., Any]] = Registry("sampler", UnknownMethodError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FocusLLaVAConfig(MethodConfig):
    """Settings of the training-free FocusLLaVA. ``keep`` or ``keep_ratio`` set the text-guided budget.

    Attributes:
        keep: visual tokens the text-guided sampler keeps per unit (default 192).
        keep_ratio: the same as a fraction of each unit's visual tokens at the input.
        budget_scope: the unit (``vtc.budget.Scope``): ``"row"``, ``"image"``, ``"frame"`` or ``"crop"``.
        layer: the text-guided sampler reads this layer's attention and prunes its output.
        vision_sampler: registered vision-guided sampler, or None to skip the stage.
        text_sampler: registered text-guided sampler, or None to skip the stage.
        redundancy: a region or window merges when its mean pairwise cosine is at least this.
        regions: region sides tried coarse to fine (4 then 2: a 4 x 4 region, else its 2 x 2 windows).
        sampler_weights: a file of trained sampler weights; the training-free samplers take none.
    """

    exclusive = (("keep", "keep_ratio"),)

    keep: int | None = None
    keep_ratio: float | None = None
    budget_scope: Scope = "row"
    layer: int = 1
    vision_sampler: str | None = "redundancy"
    text_sampler: str | None = "attention"
    redundancy: float = 0.9
    regions: tuple[int, ...] = (4, 2)
    sampler_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self, "focusllava", default={"keep": 192})
        check_int("focusllava", "layer", self.layer, -10_000)
        if not -1.0 <= self.redundancy <= 1.0:
            raise ValueError(f"focusllava: redundancy is a cosine in [-1, 1]; got {self.redundancy!r}.")
        if not self.regions or any(not isinstance(r, int) or r < 2 for r in self.regions):
            raise ValueError(f"focusllava: regions are window sides of at least 2, coarse to fine; got {self.regions}.")
        if list(self.regions) != sorted(self.regions, reverse=True):
            raise ValueError(f"focusllava: regions go from coarse to fine (descending); got {self.regions}.")


@SAMPLERS.decorator("redundancy")
def redundancy_sampler(method: FocusLLaVA, ctx: LayerContext) -> Selection:
    """Training-free vision-guided sampler: merge redundant regions, coarse sides first."""
    state, c = ctx.state, method.config
    hidden, keep = ctx.hidden.clone(), state.visual & state.valid
    coarse, *finer = c.regions
    # The side x side windows inside one coarse region, as indices into its coarse^2 tokens: [S, side^2].
    within = {side: grid_windows(coarse, coarse, side).to(hidden.device) for side in finer}
    for b in range(hidden.shape[0]):
        for members, rows, cols in list(state.grids(b, keep[b])):
            regions = members[grid_windows(rows, cols, coarse).to(members.device)]  # [R, coarse^2]
            hidden[b], gone, score = merge_windows(hidden[b], regions, c.redundancy)
            keep[b] &= ~gone
            mixed = regions[score < c.redundancy]  # regions that did not merge whole: try their sub-windows
            for side in finer:
                # Every side x side window of every mixed region at once: the windows are disjoint, so one
                # merge over all of them is the same as one per region.
                windows = mixed[:, within[side]].flatten(0, 1)
                hidden[b], gone, _ = merge_windows(hidden[b], windows, c.redundancy)
                keep[b] &= ~gone
    return Selection(keep, hidden=hidden)


@SAMPLERS.decorator("attention")
def attention_sampler(method: FocusLLaVA, call: AttentionCall) -> torch.Tensor:
    """Training-free text-guided sampler: the instruction's mean attention to each visual token.

    Without an instruction (or an image) anywhere in the batch every score is 0, so the top-k keeps the
    first tokens and the stage still keeps its declared count.
    """
    scores = visual_attention(call, text_after_image(call.state))  # mean over heads and instruction rows
    return scores if scores is not None else torch.zeros(call.state.index.shape, device=call.query.device)


@register_method
class FocusLLaVA(AttentionScoredPruner):
    """FocusLLaVA, training-free: a vision-guided merge at the LLM input, a text-guided top-k after a layer."""

    name = "focusllava"
    config_cls = FocusLLaVAConfig
    hooks = frozenset({HookPoint.EMBEDS, HookPoint.LAYER, HookPoint.ATTENTION})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "r192": {"keep": 192},
        "r128": {"keep": 128},
        "r64": {"keep": 64},
        "noop": {"keep_ratio": 1.0, "vision_sampler": None},
    }

    config: FocusLLaVAConfig

    def __init__(self, config: FocusLLaVAConfig) -> None:
        super().__init__(config)
        self.vision = SAMPLERS.get(config.vision_sampler) if config.vision_sampler else None
        self.text = SAMPLERS.get(config.text_sampler) if config.text_sampler else None
        if config.sampler_weights is not None:
            raise ValueError(
                f"focusllava: the samplers {config.vision_sampler!r} / {config.text_sampler!r} are training-free "
                f"and take no weights; register trained samplers in vtc.methods.focusllava.SAMPLERS and name them."
            )
        self._initial: torch.Tensor | None = None  # [B, G] visual tokens of each budget unit at the input

    @property
    def fixed_counts(self) -> bool:  # type: ignore[override]
        # Redundancy merges depend on the input, and so do per-image counts.
        return self.vision is None and self.budget.scope == "row"

    def text_layer(self, num_layers: int) -> int:
        layer = resolve_layer("focusllava", "layer", self.config.layer, num_layers)
        if layer >= num_layers - 1:
            raise ValueError(f"focusllava: the last layer ({num_layers - 1}) has no output left to prune.")
        return layer

    def bind(self, adapter) -> None:
        super().bind(adapter)
        self.text_layer(adapter.num_layers)

    def scored_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.text_layer(num_layers),) if self.text else ()

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0, *super().prune_layers(num_layers))  # layer 0: the vision-guided stage

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        if self.vision is not None:
            raise ValueError("focusllava's vision-guided merges depend on the input; measure with handle.stats.")
        if self.budget.scope != "row":
            raise ValueError("focusllava: per-image counts depend on the images; measure them with handle.stats.")
        if self.text is None:
            return list(visual_per_layer)
        k = self.text_layer(len(visual_per_layer)) + 1
        kept = min(int(self.budget.resolve(torch.tensor([visual_per_layer[0]]))[0]), visual_per_layer[k])
        return visual_per_layer[:k] + [kept] * (len(visual_per_layer) - k)

    def tap(self, call: AttentionCall) -> torch.Tensor:
        return self.text(self, call)

    def num_keep(self, ctx: LayerContext, present: torch.Tensor) -> torch.Tensor:
        # keep_ratio counts the visual tokens at the input, before the vision-guided merge.
        return self.budget.resolve(self._initial[:, : present.shape[1]])

    def select(self, ctx: LayerContext) -> Selection | torch.Tensor | None:
        if ctx.layer_idx == 0:
            state = ctx.state
            self._initial = Budget.count(state.visual & state.valid, self.budget.units(state))
            return self.vision(self, ctx) if self.vision is not None else None
        return super().select(ctx)
