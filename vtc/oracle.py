"""The slicing oracle: a model that drops exactly the tokens a vtc run dropped, with no scoring.

``vtc bench prefill`` times it beside the vtc run it replays, so vtc / oracle is vtc's own overhead
(scoring, taps, bookkeeping). The schedule is read from the run's statistics: every stage's kept tokens,
a pre-pass and its renumbered positions, a cache trim. Kept apart from the timing harness in
``vtc.bench`` because it is a model wrapper of its own, installed without ``vtc.wrap``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc import surface

if TYPE_CHECKING:
    from vtc.config import MethodConfig
    from vtc.state import TokenStats


@dataclasses.dataclass(frozen=True)
class Slice:
    """One gather of the token sequence at the input of a decoder layer.

    Attributes:
        layer: the decoder layer whose input is gathered (0 = the embeddings).
        positions: ``[n]`` input positions of the tokens that stay, ascending.
        index: ``[n]`` slots of those tokens in the sequence before the gather.
        fresh: the kept tokens are renumbered 0..n-1 for the rotary embeddings (GemFilter's second pass)
            instead of keeping the positions they had.
    """

    layer: int
    positions: torch.Tensor
    index: torch.Tensor
    fresh: bool = False


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pruned prefill's token schedule as vtc measured it, for one unpadded sequence.

    Attributes:
        input_length: tokens of the text backbone's input.
        slices: the gathers in execution order; stages that kept every token are left out (no gather).
        prepass_layers: layers ``0..prepass_layers-1`` first run on the whole input without a cache
            (GemFilter's pre-pass); 0 for none.
        cache_trim: ``(layer, [n] slots)`` pairs: after the prefill, that layer's KV cache keeps only those
            slots of the tokens it computed on (MustDrop's output-aware cache).
    """

    input_length: int
    slices: tuple[Slice, ...] = ()
    prepass_layers: int = 0
    cache_trim: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def from_stats(cls, stats: TokenStats, input_length: int, fresh: Collection[str] = ()) -> Schedule:
        """The schedule that ``stats`` of one vtc prefill record.

        Everything comes from the measurements and nothing from a method's code, so the oracle follows any
        stage a method adds: each stage's ``kept_tokens`` gives a gather, ``prepass_tokens_per_layer`` the
        pre-pass, and a layer whose ``cache_tokens_per_layer`` is below its ``tokens_per_layer`` a cache trim.

        Args:
            stats: the handle's stats after one prefill of batch size 1 without padding.
            input_length: tokens of that prefill's input (the stages record positions into it).
            fresh: names of the methods whose stages renumber the tokens they keep. The stats record input
                positions only, so this comes from the configs (``renumbering_methods``).
        """
        if stats.batch_size != 1:
            raise ValueError(f"the slicing oracle replays one unpadded row; these stats hold {stats.batch_size}.")
        slices: list[Slice] = []
        current = torch.arange(input_length)
        for stage in stats.stages:
            kept = stage.kept_tokens[0].long()
            if len(kept) == len(current):
                continue  # the stage ran (its scoring is vtc's cost) but gathered nothing
            index = torch.searchsorted(current, kept).clamp(max=len(current) - 1)
            if not bool((current[index] == kept).all()):
                raise ValueError(f"stage {stage.method}@{stage.layer} keeps tokens that an earlier stage dropped.")
            slices.append(Slice(stage.layer, kept, index, stage.method in fresh))
            current = kept
        trim = []
        held_per_layer = stats.cache_tokens_per_layer or stats.tokens_per_layer  # no cache: nothing trimmed
        for layer, (computed, held) in enumerate(zip(stats.tokens_per_layer, held_per_layer, strict=True)):
            if held[0] == computed[0]:
                continue
            if held[0] != len(current):
                raise ValueError(
                    f"layer {layer} caches {held[0]} of its {computed[0]} tokens, but the prefill ends with "
                    f"{len(current)}; the oracle replays only trims to the final tokens."
                )
            seen = next((s.positions for s in reversed(slices) if s.layer <= layer), torch.arange(input_length))
            trim.append((layer, torch.searchsorted(seen, current)))
        return cls(input_length, tuple(slices), len(stats.prepass_tokens_per_layer), tuple(trim))

    def to(self, device: torch.device) -> Schedule:
        """The same schedule with its index tensors on `device`."""
        return dataclasses.replace(
            self,
            slices=tuple(dataclasses.replace(s, index=s.index.to(device)) for s in self.slices),
            cache_trim=tuple((layer, slots.to(device)) for layer, slots in self.cache_trim),
        )


def renumbering_methods(configs: Iterable[MethodConfig]) -> frozenset[str]:
    """Methods among `configs` whose stages renumber the tokens they keep (``positions="fresh"``)."""
    return frozenset(c.method for c in configs if getattr(c, "positions", "original") == "fresh")


class _PrepassDone(Exception):  # noqa: N818  (control flow, not an error)
    """Raised after the oracle's pre-pass reaches its last layer, to stop the backbone."""


class SliceOracle:
    """The cheapest possible replay of a pruning schedule: the same gathers, with no scoring at all.

    It runs the measured schedule of a vtc prefill on the unwrapped model: the same pre-pass, a gather of
    the hidden states and rotary embeddings at each stage's layer to the very tokens vtc kept, the same
    renumbering, and the same cache trim after the prefill. It decides nothing, so it says nothing about
    accuracy; it is the speed ceiling of that schedule, and a method's speedup over dense divided by this
    oracle's measures only vtc's own cost (scoring, taps, bookkeeping). Its hooks are its own (it does not
    use ``vtc.wrap``), and it handles one unpadded row, the benchmark's case.

    After each forward, ``tokens_per_layer`` and ``prepass_tokens_per_layer`` hold the token counts the
    decoder layers actually received.
    """

    def __init__(self, model: nn.Module, schedule: Schedule) -> None:
        from vtc.adapters import adapter_for

        parts = adapter_for(model)  # finds the text backbone and its layers; installs nothing
        self.model, self.schedule = model, schedule
        self._text_model, self._layers, self._rotary = parts.text_model, parts.layers, parts.rotary
        self._config = parts.text_config
        if any(t != "full_attention" for t in getattr(self._config, "layer_types", None) or ()):
            raise ValueError("the slicing oracle builds full causal masks; this model has sliding-window layers.")
        self._by_layer: dict[int, list[Slice]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._in_prepass = False
        self._segment: tuple[tuple[torch.Tensor, ...], Any] | None = None  # (cos, sin), mask after a gather
        self._cache: Any = None
        self._trim: tuple[tuple[int, torch.Tensor], ...] = ()
        self.tokens_per_layer: list[int] = []
        self.prepass_tokens_per_layer: list[int] = []

    # -- hooks --------------------------------------------------------------------------------------
    def _on_text_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_prepass:
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[0] != 1 or embeds.shape[1] != self.schedule.input_length:
            shape = None if embeds is None else tuple(embeds.shape[:2])
            raise ValueError(
                f"the slicing oracle replays a prefill of one row of {self.schedule.input_length} tokens; "
                f"the text backbone got inputs of shape {shape}."
            )
        mask = kwargs.get(surface.ATTENTION_MASK)
        if mask is not None and not bool(mask.all()):
            raise ValueError("the slicing oracle replays unpadded rows; this attention mask hides tokens.")
        self._cache = surface.get_cache(kwargs)
        if self._cache is not None and surface.cached_length(self._cache) > 0:
            raise ValueError("the slicing oracle replays prefills; this forward continues a cache.")
        self._segment = None
        self.tokens_per_layer, self.prepass_tokens_per_layer = [], []
        if self.schedule.prepass_layers:
            self._run_prepass(kwargs)

    def _run_prepass(self, kwargs: dict) -> None:
        """Layers ``0..prepass_layers-1`` on the whole input, without a cache, as GemFilter's first pass."""

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise _PrepassDone

        handle = self._layers[self.schedule.prepass_layers - 1].register_forward_hook(stop)
        self._in_prepass = True
        try:
            self._text_model(**surface.with_cache({**kwargs, "use_cache": False}, self._text_model, None))
        except _PrepassDone:
            pass
        finally:
            self._in_prepass = False
            handle.remove()

    def _on_layer(self, i: int) -> Callable[..., tuple[tuple, dict] | None]:
        slices = self._by_layer.get(i, [])

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = args[0] if args else kwargs[surface.HIDDEN_STATES]
            if self._in_prepass:
                self.prepass_tokens_per_layer.append(hidden.shape[1])
                return None
            for s in slices:
                hidden = hidden.index_select(1, s.index)  # [1, L, d] -> [1, n, d]
                if s.fresh:
                    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, n]
                    cos_sin = tuple(self._rotary(hidden, positions))
                else:
                    source = self._segment[0] if self._segment else kwargs[surface.POSITION_EMBEDDINGS]
                    cos_sin = tuple(t.index_select(-2, s.index) for t in source)  # [..., 1, L, D] -> [..., 1, n, D]
                mask = surface.causal_mask(self._config, hidden, None, self._cache, None if self._cache is None else i)
                self._segment = (cos_sin, mask)
            self.tokens_per_layer.append(hidden.shape[1])
            if self._segment is None:
                return None
            kwargs[surface.POSITION_EMBEDDINGS], kwargs[surface.ATTENTION_MASK] = self._segment
            if surface.POSITION_IDS in kwargs:
                kwargs[surface.POSITION_IDS] = None  # the rotary embeddings are set; ids with gaps mean nothing
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, surface.HIDDEN_STATES: hidden}

        return hook

    def _on_text_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._in_prepass:
            return
        cache = self._cache if self._cache is not None else surface.output_cache(output)
        if cache is None:
            return
        for layer, slots in self._trim:
            keys, values = surface.layer_kv(cache, layer)
            # [1, Hkv, L, D] -> [1, Hkv, n, D]
            surface.set_layer_kv(cache, layer, keys.index_select(2, slots), values.index_select(2, slots))

    # -- installing ---------------------------------------------------------------------------------
    def __enter__(self) -> SliceOracle:
        device = next(self.model.parameters()).device
        schedule = self.schedule.to(device)
        self._by_layer = {}
        for s in schedule.slices:
            self._by_layer.setdefault(s.layer, []).append(s)
        self._trim = schedule.cache_trim
        text = self._text_model
        self._hooks.append(text.register_forward_pre_hook(self._on_text_start, with_kwargs=True))
        self._hooks.append(text.register_forward_hook(self._on_text_end, with_kwargs=True))
        for i, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_pre_hook(self._on_layer(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
