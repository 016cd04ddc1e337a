"""Methods, the hook points they act on, and the template bases that keep them small.

A method is a class with a registered ``name``, a ``config_cls`` holding its settings, the hook points
it uses and the adapter capabilities it needs. ``vtc.wrap`` makes a new instance for every wrapped
model, so runtime buffers live on the instance and never on the (frozen, shareable) config.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vtc.budget import Budget, keep_top_k
from vtc.config import MethodConfig
from vtc.contexts import AttentionCall, LayerContext, Selection, StepContext, VisionContext
from vtc.errors import MissingCapabilityError, UnknownMethodError
from vtc.registry import Registry

if TYPE_CHECKING:
    from vtc.adapters.base import Adapter
    from vtc.state import VisualTokenState


class HookPoint(enum.Enum):
    """Where a method acts, in execution order (see ARCHITECTURE.md section 3)."""

    VISION = "vision"  # vision-tower features -> new features or a keep set
    EMBEDS = "embeds"  # merged input embeddings -> keep set, before decoder layer 0
    LAYER = "layer"  # decoder layer i's input -> keep set
    ATTENTION = "attention"  # q, k, v of chosen layers -> a tap (read) or an edit (weights)
    CACHE = "cache"  # the KV cache after prefill -> evictions
    GENERATE = "generate"  # the whole decoding loop


def _video_families() -> list[str]:
    from vtc.adapters import ADAPTERS

    return [n for n in ADAPTERS.names() if "video" in ADAPTERS.get(n).modalities]


class Method:
    """Base of every method.

    Subclasses set the class attributes, implement what their hook points need, and register with
    ``@register_method``. A pruning stage implements ``prune_layers`` and ``select``; a method that reads
    attention implements ``tap_layers`` and ``on_attention``.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    hooks: ClassVar[frozenset[HookPoint]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    #: preset name -> settings, e.g. ``{"r128": {"budget": 128}}``; selected as ``"name.r128"``.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The tokens kept follow from the settings alone (``plan`` can say them); False for thresholds.
    fixed_counts: ClassVar[bool] = True
    #: The method removes tokens; False for methods that only change attention or decoding (VAR, DeCo).
    prunes: ClassVar[bool] = True
    #: The method's stages (and their taps) also act in extend forwards: new tokens over a non-empty
    #: cache, such as a later image in a chat or a streamed video chunk. They then see only the new tokens.
    extends: ClassVar[bool] = False
    #: Settings without a usable default that a user must give (speculative decoding's draft model);
    #: the method cannot run from its name alone.
    required_settings: ClassVar[tuple[str, ...]] = ()
    #: The media the method acts on. A video-only method (VideoScan) needs a family that takes video
    #: (``Adapter.modalities``) and leaves image inputs as they are.
    media: ClassVar[frozenset[str]] = frozenset({"image", "video"})
    #: An output hook (``on_output``) that changes decoding corrects every new position of a forward on
    #: its own, from what that position alone computed (DeCo), so a Generator that scores several tokens in
    #: one forward (speculative decoding's verify) can decode through it exactly.
    per_position: ClassVar[bool] = False
    #: Why a decoding output hook cannot be applied per position (said when a Generator is refused beside it).
    single_step_reason: ClassVar[str] = ""

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{self.name} takes a {self.config_cls.__name__}; got {type(config).__name__}.")
        self.config = config
        self.adapter: Adapter | None = None

    def bind(self, adapter: Adapter) -> None:
        """Resolve model-dependent values; raise if the model cannot host this method."""
        missing = sorted(self.requires - adapter.capabilities)
        if missing:
            raise MissingCapabilityError(
                f"method {self.name!r} needs {', '.join(missing)}, which the {adapter.name!r} adapter does not "
                f"provide; choose another method for this model family."
            )
        if not self.media & adapter.modalities:
            raise MissingCapabilityError(
                f"method {self.name!r} acts on {' and '.join(sorted(self.media))} input, and the {adapter.name!r} "
                f"family takes only {' and '.join(sorted(adapter.modalities))}; wrap a family that takes video "
                f"(supported: {', '.join(_video_families())})."
            )
        self.adapter = adapter

    def check_company(self, others: list[Method]) -> None:
        """Raise ``MethodConflictError`` when this method cannot run beside `others` (checked at wrap).

        For methods that change how the prompt is fed (VideoScan feeds a video frame by frame), which
        other methods' stages would then never see.
        """

    # -- pruning stages (LAYER, EMBEDS) -------------------------------------------------------------
    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers at whose input this method prunes (0 = the embeddings) in a model of `num_layers`."""
        return ()

    def select(self, ctx: LayerContext) -> torch.Tensor | Selection | None:
        """Decide what to keep: ``[B, L]`` bool (true for visual slots to keep), a ``Selection``, or None."""
        raise NotImplementedError

    def cache_trim_from(self, num_layers: int) -> int | None:
        """A layer r: after the prefill, layers r.. keep in their KV cache only the tokens that reached the end.

        For methods whose decoding should see only the final token set (MustDrop's output-aware cache);
        layers before r keep what they computed on.
        """
        return None

    def prepass_layer(self, num_layers: int) -> int | None:
        """A layer r: run layers 0..r on the full prefill first (taps active), then the real forward.

        For methods that must look deep into the model before choosing what the whole model sees
        (GemFilter). The pre-pass writes no KV cache.
        """
        return None

    def needs_prepass(self, state: VisualTokenState) -> bool:
        """Whether this prefill (its input `state`) needs the pre-pass; False skips it, e.g. when no row can drop."""
        return True

    def plan(self, visual_per_layer: list[int], text_tokens: int) -> list[int]:
        """Visual tokens entering each layer after this method, for one sequence, without running the model.

        Used for analytic FLOPs (``vtc flops``); must agree with what ``select`` keeps on such an input.

        Args:
            visual_per_layer: visual tokens entering each layer before this method.
            text_tokens: text tokens of the prompt.
        """
        return list(visual_per_layer)

    # -- attention taps (ATTENTION) -----------------------------------------------------------------
    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose attention call this method reads during prefill."""
        return ()

    def on_attention(self, call: AttentionCall) -> None:
        """Read one attention call of a tapped layer (prefill only)."""

    # -- layer readers (LAYER, read-only) -----------------------------------------------------------
    def read_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose input hidden states this method reads, in prefill and decode steps."""
        return ()

    def on_layer_input(self, ctx: LayerContext) -> None:
        """Read the input of a read layer (after any pruning stage at that layer); never change it."""

    # -- attention edits (ATTENTION) -----------------------------------------------------------------
    def edit_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose post-softmax attention weights this method edits (prefill and decode)."""
        return ()

    def edit_attention(self, call: AttentionCall) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """An edit for this attention call, or None to leave it on the model's own kernel.

        ``call.state`` is set in a prefill and None in a decode step. The returned function takes the
        fp32 post-softmax weights ``[B, Hq, Lq, Lk]`` and returns edited weights of the same shape, whose
        rows should still sum to one; the adapter then computes ``weights @ v`` for this layer only.
        """
        return None

    # -- sparse attention (ATTENTION) ----------------------------------------------------------------
    def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers whose prefill attention this method may compute itself (``sparse_attention``)."""
        return ()

    def sparse_attention(self, call: AttentionCall) -> torch.Tensor | None:
        """The attention output of one prefill call of a sparse layer, or None for the model's own kernel.

        For methods whose prefill attends among a subset of the tokens (ZipVL): the method computes the
        output itself from ``call`` (q, k, v, the layer's mask) without the L x L weights, and the layer
        continues with it. Returns ``[B, Lq, Hq, D]`` in the query's dtype, as attention functions do.
        """
        return None

    # -- outputs (GENERATE through stock generate) ---------------------------------------------------
    def on_text_output(self, hidden: torch.Tensor, state: VisualTokenState) -> None:
        """Read the text backbone's final (normed) hidden states ``[B, L, d]`` of a prefill, with its state."""

    def on_output(self, step: StepContext) -> Any | None:
        """Return a replacement for the model's output (e.g. new last-position logits), or None.

        Runs after every call of the wrapped model, before ``generate``'s logits processors see the
        logits, so greedy, sampling and beam search all decode what this returns.
        """
        return None

    # -- vision tower (VISION) ---------------------------------------------------------------------
    def vision_layers(self, num_layers: int) -> tuple[int, ...]:
        """Tower layers at whose input this method acts, for a tower of `num_layers` layers."""
        return ()

    def vision_select(self, ctx: VisionContext) -> Selection | None:
        """Tokens to keep in the tower (hidden ones stop being keys for later tower layers)."""
        raise NotImplementedError

    def vision_tap_layers(self, num_layers: int) -> tuple[int, ...]:
        """Tower layers whose attention call this method reads."""
        return ()

    def on_vision_attention(self, call: AttentionCall) -> None:
        """Read one attention call of a tapped tower layer."""

    def on_vision_start(self) -> None:
        """A batch of images enters the tower: drop buffers from the previous one."""

    # -- lifecycle ----------------------------------------------------------------------------------
    def on_forward_start(self) -> None:
        """A new prefill starts: drop buffers from the previous one."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def realign(values: torch.Tensor, tapped: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-token `values` recorded over slots whose input positions were `tapped`, read at `index`.

    A tap records values for the tokens its layer saw; a stage later in the same forward may see fewer
    (an earlier stage dropped some). Both position lists ascend, so each token is found by search.

    Args:
        values: ``[B, L_tapped, ...]``.
        tapped: ``[B, L_tapped]`` input positions (-1 for padding slots) of the tapped slots.
        index: ``[B, L]`` input positions of the current slots.

    Returns:
        ``[B, L, ...]``: the values of the current slots.
    """
    if tapped.shape == index.shape and bool((tapped == index).all()):
        return values
    slot = torch.searchsorted(tapped.contiguous(), index.contiguous()).clamp(max=tapped.shape[1] - 1)  # [B, L]
    trailing = values.shape[2:]
    slot = slot.view(*slot.shape, *(1,) * len(trailing)).expand(*slot.shape, *trailing)  # [B, L, ...]
    return values.gather(1, slot)


class ScoringPruner(Method):
    """Template for pruners that score tokens and keep the best: score -> budget -> stable top-k -> keep.

    A subclass writes ``score``; the base resolves the config's ``Budget`` per unit (a row, or each image
    of a row), takes a stable top-k among the candidates of each unit (ties go to the lower index,
    ``vtc.kernels.topk_gather``) and keeps those. Subclasses change one step each: ``candidates`` (what
    competes), ``num_keep`` (a count the budget cannot express, such as SparseVLM's rank rule), ``choose``
    (a rule other than top-k, such as MustDrop's thresholds) or ``finish`` (merged tokens, another scope).
    """

    hooks = frozenset({HookPoint.LAYER})

    @functools.cached_property
    def budget(self) -> Budget:
        """The visual tokens this method keeps per unit, from its config's budget fields."""
        return Budget.of(self.config)

    def score(self, ctx: LayerContext) -> torch.Tensor | None:
        """``[B, L]`` scores over the current slots (higher = keep), or None to keep everything this time."""
        raise NotImplementedError

    def candidates(self, ctx: LayerContext) -> torch.Tensor:
        """``[B, L]`` bool: the slots that compete (default: valid visual tokens)."""
        return ctx.state.visual & ctx.state.valid

    def num_keep(self, ctx: LayerContext, present: torch.Tensor) -> torch.Tensor:
        """``[B, G]`` tokens to keep in each unit that holds ``[B, G]`` `present` candidates (the budget's)."""
        return self.budget.resolve(present)

    def choose(self, ctx: LayerContext, scores: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool kept candidates: the budget's count per unit, by a stable top-k of `scores`."""
        candidates = self.candidates(ctx)
        units = self.budget.units(ctx.state)  # [B, L]
        present = Budget.count(candidates, units)  # [B, G]
        k = torch.minimum(self.num_keep(ctx, present), present)
        return keep_top_k(scores, k, candidates, units)

    def finish(self, ctx: LayerContext, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | Selection:
        """What the stage returns for the kept slots (default: the mask itself, visual scope)."""
        return keep

    def select(self, ctx: LayerContext) -> torch.Tensor | Selection | None:
        scores = self.score(ctx)
        if scores is None:
            return None
        return self.finish(ctx, scores, self.choose(ctx, scores))


class AttentionScoredPruner(ScoringPruner):
    """Template for pruners scored by attention: tap at layer i-1 -> realign -> score -> top-k -> keep.

    A subclass writes ``tap``: from one attention call of a tapped layer, ``[B, L, ...]`` values over that
    call's slots (``AttentionCall.rows`` gives softmax rows without the L x L matrix). The base records
    them with the slots' input positions and, at the stage that reads them, realigns them to the current
    slots (an earlier stage of the same forward may have dropped some) and hands them to ``choose``.
    By default a stage prunes the output of each layer in ``scored_layers``, reading that layer's tap.
    """

    hooks = frozenset({HookPoint.LAYER, HookPoint.ATTENTION})
    requires = frozenset({"attn_tap"})

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        #: tapped layer -> (values, input positions of the tapped slots), or None: nothing to score.
        self.tapped: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def scored_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers whose attention is tapped and whose outputs are pruned (the stage runs at the next input)."""
        raise NotImplementedError

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(x + 1 for x in self.scored_layers(num_layers))

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.scored_layers(num_layers)

    def tapped_for(self, layer_idx: int) -> int:
        """The tapped layer whose values score the stage at the input of `layer_idx` (default: the one before)."""
        return layer_idx - 1

    def tap(self, call: AttentionCall) -> torch.Tensor | None:
        """``[B, L, ...]`` values over the call's slots, or None when there is nothing to score (no query row)."""
        raise NotImplementedError

    def on_forward_start(self) -> None:
        self.tapped = {}

    def on_attention(self, call: AttentionCall) -> None:
        values = self.tap(call)
        self.tapped[call.layer_idx] = None if values is None else (values, call.state.index)

    def score(self, ctx: LayerContext) -> torch.Tensor | None:
        """The tapped values, realigned to the current slots; None when the tap found nothing to score."""
        layer = self.tapped_for(ctx.layer_idx)
        if layer not in self.tapped:
            raise RuntimeError(
                f"{self.name}: layer {layer} did not report its attention in this forward; vtc's attention tap "
                f"was bypassed (was the attention implementation changed after wrapping?)."
            )
        recorded = self.tapped[layer]
        return None if recorded is None else realign(*recorded, ctx.state.index)


METHODS: Registry[type[Method]] = Registry("method", UnknownMethodError)


def register_method(cls: type[Method]) -> type[Method]:
    """Register a method class and tie its config class to its name (the one registration point)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` before it can be registered.")
    if cls.config_cls is MethodConfig:
        raise ValueError(f"{cls.__name__} needs its own `config_cls` (a MethodConfig subclass).")
    cls.config_cls.method = cls.name
    for preset, settings in cls.presets.items():
        cls.config_cls(**settings)  # a broken preset fails at import, not in a user's run
        if "." in preset:
            raise ValueError(f"preset names contain no '.'; got {cls.name}.{preset}.")
    return METHODS.register(cls.name, cls)


def get_method(name: str) -> type[Method]:
    """The registered method class called `name` (importing the built-in methods first)."""
    import vtc.methods  # noqa: F401  (registers the built-in methods)

    return METHODS.get(name)
