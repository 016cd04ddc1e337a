"""Sessions: one per ``vtc.wrap``; the hooks of ``vtc.engine.dispatch`` call the active one.

A ``Session`` holds one pipeline of methods, the state of the forward in progress and the statistics.
The family adapter it works through is stateless: it finds parts and describes tokens. Each forward of
the text backbone is a prefill, an extend or a decode (``ForwardKind``); stages act in prefills and,
for methods that say so, in extends that carry visual tokens.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc import surface
from vtc.engine import compaction, tower
from vtc.engine.cache import CacheView
from vtc.engine.record import RECORD_ATTR, CacheRecord, Chunk, Forward, ForwardKind, Segment, boundary, record_of
from vtc.method import AttentionCall, LayerContext, StepContext
from vtc.state import TokenStats, VisualTokenState

if TYPE_CHECKING:
    from vtc.adapters.base import Adapter
    from vtc.compose import Pipeline


class _PrepassDone(Exception):  # noqa: N818  (control flow, not an error)
    """Raised after the pre-pass's last layer to stop the backbone (caught by the session)."""


class _Embedded(Exception):  # noqa: N818  (control flow, not an error)
    """Raised at the text backbone's input during ``Session.embed``, carrying what the model merged."""

    def __init__(self, embeds: torch.Tensor, pending: Any, positions: torch.Tensor | None) -> None:
        super().__init__()
        self.embeds, self.pending, self.positions = embeds, pending, positions


class BoundAdapter:
    """The family adapter as one session's methods see it: its parts and shapes, plus the session's
    forward in progress (``current_cache``) and ``run_extra``."""

    def __init__(self, adapter: Adapter, session: Session) -> None:
        self._adapter = adapter
        self._session = weakref.ref(session)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    @property
    def current_cache(self) -> Any:
        """The KV cache of the forward running now (None outside a forward or without a cache)."""
        fwd = self._session().fwd
        return fwd.cache if fwd is not None else None

    def run_extra(self, **kwargs: Any) -> Any:
        return self._session().run_extra(**kwargs)

    def embed(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None]:
        return self._session().embed(**inputs)

    @property
    def stats(self) -> TokenStats:
        """The session's statistics (a new object after each prefill)."""
        return self._session().stats

    @property
    def methods(self) -> tuple[Any, ...]:
        """The session's methods in pipeline order."""
        return tuple(self._session().pipeline.methods)


class Session:
    """One wrap's pipeline, its forward in progress, and its statistics.

    Args:
        model: the wrapped model.
        adapter: its family adapter (stateless).
        pipeline: the bound methods, indexed by role.
    """

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        #: What the session's methods bind to: the adapter plus this session's forward in progress.
        self.bound = BoundAdapter(adapter, self)
        self.stats = TokenStats(dims=adapter.model_dims)
        self.fwd: Forward | None = None
        self.call_kind: ForwardKind | None = None  # the kind of the model call in progress (not extra ones)
        self.tower_valid: torch.Tensor | None = None
        self._pending_visual: torch.Tensor | None = None
        self._in_prepass = False
        self._in_extra = False
        self._in_embed = False

    def set_pipeline(self, pipeline: Pipeline) -> None:
        """Take the pipeline of methods bound to ``self.bound``; index what the hooks need."""
        self.pipeline = pipeline
        tower_layers = self.adapter.vision_encoder_layers()
        if tower_layers is not None:
            pipeline.bind_vision(len(tower_layers))
        self.text_attention_layers = set(pipeline.tap_layers) | set(pipeline.edit_layers) | set(pipeline.sparse_layers)

    # -- attention routing ---------------------------------------------------------------------------
    def attends(self, part: str, layer: int) -> bool:
        """Whether this session taps or edits that attention call now."""
        if part == "vision":
            return layer in self.pipeline.vision_tap_layers
        fwd = self.fwd
        if fwd is None:
            return False
        if layer in self.pipeline.edit_layers and not self._in_prepass:
            return True
        if fwd.prefill:  # the pre-pass belongs to the prefill: its taps read
            return layer in self.pipeline.tap_layers or (layer in self.pipeline.sparse_layers and not self._in_prepass)
        return fwd.kind is ForwardKind.EXTEND and layer in self.pipeline.extend_tap_layers

    def attention_edit(self, part: str, call: AttentionCall) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if part != "text" or self._in_prepass or call.layer_idx not in self.pipeline.edit_layers:
            return None
        return self.pipeline.edit_attention(
            dataclasses.replace(call, state=self.fwd.state if self.fwd.prefill else None)
        )

    def sparse_attention(self, part: str, call: AttentionCall) -> torch.Tensor | None:
        """A method's own output for a prefill attention call of a sparse layer (None: the model's kernel)."""
        if part != "text" or self._in_prepass or not self.fwd.prefill:
            return None
        if call.layer_idx not in self.pipeline.sparse_layers:
            return None
        return self.pipeline.sparse_attention(dataclasses.replace(call, state=self.fwd.state))

    def attention_tap(self, part: str, call: AttentionCall) -> None:
        if part == "vision":
            tower.on_attention(self, call)
            return
        if self._in_prepass or self.fwd.prefill:
            self.pipeline.on_attention(dataclasses.replace(call, state=self.fwd.state))
        elif self.fwd.kind is ForwardKind.EXTEND:
            self.pipeline.on_attention(dataclasses.replace(call, state=self.fwd.state), extend=True)

    # -- the multimodal model ------------------------------------------------------------------------
    def on_vlm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        visual = self.adapter.visual_mask(input_ids, kwargs.get("inputs_embeds"))
        if not surface.carries_media(kwargs):
            visual = torch.zeros_like(visual)  # placeholder ids without pixels are text to the model
        layout = self.adapter.layout(visual, {**kwargs, "input_ids": input_ids})
        self._pending_visual = (visual, layout)

    def on_text_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._in_prepass:
            return args, kwargs
        if self._in_embed:
            pending, self._pending_visual = self._pending_visual, None
            raise _Embedded(kwargs.get("inputs_embeds"), pending, kwargs.get(surface.POSITION_IDS))
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError(
                "vtc wraps the multimodal model; call the model (or its generate), not its text backbone alone."
            )
        batch, length = embeds.shape[:2]
        cache = surface.get_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        use_cache = self.adapter.text_config.use_cache if use_cache is None else use_cache
        pending, self._pending_visual = self._pending_visual, None
        visual, layout = pending if pending is not None else (None, None)
        if visual is None:  # the text backbone was called without the multimodal model around it
            raise ValueError(
                "vtc wraps the multimodal model; call the model (or its generate), not its text backbone alone."
            )
        if visual.shape != (batch, length):
            raise ValueError(
                f"the text backbone got {length} tokens per row, but the model's input marked visual tokens over "
                f"{visual.shape[1]}; vtc cannot tell where the images are. Pass input_ids (or inputs_embeds) "
                f"whose placeholders match the image features."
            )
        user_mask = kwargs.get(surface.ATTENTION_MASK)
        self._check_cache(cache)
        if user_mask is not None and user_mask.dim() != 2 and self.pipeline.prunes:
            raise ValueError(
                "vtc needs the 2-D attention mask of shape [batch, length] (padding mask); a custom 4-D mask "
                "cannot be compacted after pruning. Pass the 2-D mask instead."
            )
        past = surface.cached_length(cache) if cache is not None else 0
        kind = ForwardKind.PREFILL if past == 0 else ForwardKind.DECODE if length == 1 else ForwardKind.EXTEND
        if not self._in_extra:
            self.call_kind = kind
        if kind is ForwardKind.PREFILL and use_cache and cache is None:
            # The backbone would create this same cache itself; creating it here lets the pruned
            # prefill leave its record on it, so later forwards on the cache find it.
            cache = surface.new_cache(self.adapter.text_config)
            surface.set_cache(kwargs, self.adapter.text_model, cache)
        record = record_of(cache)
        if kind is ForwardKind.PREFILL and record is not None:  # a reused, emptied cache: its record is stale
            delattr(cache, RECORD_ATTR)
            record = None
        if record is None and kind is not ForwardKind.PREFILL and self.pipeline.prunes:
            self._check_unrecorded(cache)
        if record is not None:
            record.reset_forward()
        last = self.adapter.num_layers - 1
        dense_before = past if record is None else surface.cached_length(cache, last) - record.recorded(last)
        valid = user_mask[:, -length:].bool() if user_mask is not None else torch.ones_like(visual)
        state = VisualTokenState.initial(visual, valid, layout)
        positions = kwargs.get(surface.POSITION_IDS)
        if positions is None:  # what the backbone will use: positions after the cached ones
            positions = (torch.arange(length, device=embeds.device) + past).expand(batch, length)
        mask = user_mask if kind is not ForwardKind.PREFILL else None
        self.fwd = Forward(kind, state, cache, [Segment(0, state)], record, dense_before, mask, positions)
        self.fwd.boundaries.append(boundary(0, state))
        if kind is ForwardKind.PREFILL:
            if not self._in_extra:  # a decoding method's extra forward keeps the stats and buffers
                self.stats = TokenStats(dims=self.stats.dims)
                self.stats.image_tokens = self.adapter.image_token_counts(visual, layout)
                self.stats.input_tokens = valid.sum(dim=1).tolist()  # before any stage: what dense runs
                self.pipeline.on_forward_start()
            if self.pipeline.prepass_layer is not None and self.pipeline.needs_prepass(state):
                self._run_prepass(kwargs, self.pipeline.prepass_layer)
        elif not self._in_extra:
            self.stats.decode_steps += 1
            self.stats.extends += kind is ForwardKind.EXTEND
        return args, kwargs

    def on_text_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._in_prepass:
            return
        fwd, self.fwd = self.fwd, None
        if fwd is None:
            return
        trim = self.pipeline.cache_trim_from
        if fwd.prefill and fwd.cache is not None and trim is not None and len(fwd.segments) > 1:
            fwd.segments = compaction.trim_cache(self, fwd, trim)
        if fwd.cache is not None and fwd.compacted():
            self._record(fwd)
        if fwd.cache is not None and self.pipeline.cache_hooks and not self._in_extra:
            view = CacheView(fwd.cache, self.adapter.num_layers, last=fwd.input_state, last_column=fwd.column)
            self.pipeline.on_cache(view, fwd.kind)
        if fwd.prefill and self.pipeline.text_output_methods:
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self.pipeline.on_text_output(hidden, fwd.state)
        if fwd.prefill and not self._in_extra:
            self._fill_layer_stats(fwd)

    def _record(self, fwd: Forward) -> None:
        """Append this forward's chunk to the cache's record (after the dense tokens before it)."""
        for seg in fwd.segments:
            seg.reset_forward()
        record = fwd.record if fwd.record is not None else CacheRecord([])
        if fwd.dense_before:
            start = record.columns if record.chunks else 0
            record.chunks.append(Chunk.dense(start, fwd.dense_before, fwd.state.batch_size, fwd.state.index.device))
        record.chunks.append(Chunk(fwd.column, fwd.length, fwd.segments))
        # On the cache object itself, so copies of the cache (copy.deepcopy) carry it along.
        setattr(fwd.cache, RECORD_ATTR, record)

    # -- decoder layers ------------------------------------------------------------------------------
    def on_layer(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        fwd = self.fwd
        if fwd is None or self._in_prepass:
            return None
        hidden = args[0] if args else kwargs.pop(surface.HIDDEN_STATES)
        if i in self.pipeline.stage_layers_for(fwd.kind) and (fwd.prefill or fwd.has_visual):
            hidden = compaction.run_stages(self, i, hidden, kwargs, fwd)
        if compaction.touched(fwd, i):
            compaction.layer_kwargs(self, i, hidden, kwargs, fwd)
        if i in self.pipeline.read_layers:  # readers see the compacted input
            state = fwd.state if fwd.prefill else None
            self.pipeline.on_layer_input(LayerContext(i, hidden, state, self.bound))
        return (hidden, *args[1:]), kwargs

    def _run_prepass(self, kwargs: dict, last: int) -> None:
        """Run decoder layers 0..`last` on the full prefill, without cache, so taps see them first."""

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise _PrepassDone

        handle = self.adapter.layers[last].register_forward_hook(stop)
        self._in_prepass = True
        try:
            self.adapter.text_model(**surface.with_cache({**kwargs, "use_cache": False}, self.adapter.text_model, None))
        except _PrepassDone:
            pass
        finally:
            self._in_prepass = False
            handle.remove()
        counts = self.fwd.state.num_tokens().tolist()
        self.stats.prepass_tokens_per_layer = [counts] * (last + 1)

    # -- outputs -------------------------------------------------------------------------------------
    def on_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._in_extra:
            return None
        prefill = self.call_kind is ForwardKind.PREFILL
        return self.pipeline.on_output(StepContext(kwargs, output, prefill, self.bound))

    def run_extra(self, **kwargs: Any) -> Any:
        """Run the wrapped model once more inside a decoding step (e.g. an ensemble member).

        Pruning stages and attention edits run as usual; output methods do not (no recursion), and the
        forward counts in ``stats.extra_forwards`` rather than as a decode step.
        """
        if self._in_extra:
            raise RuntimeError("an extra forward cannot start another extra forward.")
        saved = self.fwd
        self._in_extra = True
        try:
            out = self.model(**kwargs)
        finally:
            self._in_extra = False
            self.fwd = saved
        self.stats.extra_forwards += 1
        return out

    def embed(self, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None]:
        """The multimodal model's merged input embeddings of `inputs`, without running the text backbone.

        For methods that feed the text backbone themselves in pieces (VideoScan feeds a video frame by
        frame): the model's own vision path encodes and places the images and videos, whatever the family.
        Vision-tower stages run as in any forward; nothing is cached and no statistics change.

        Returns:
            ``(embeds [B, L, d], visual [B, L], layout, positions)``: the embeddings the text backbone would
            receive, where the visual tokens are, their ``VisualLayout`` (None without visual tokens), and
            the position ids the model computed for them (M-RoPE families; None where the backbone numbers
            positions itself).
        """
        if self._in_embed or self._in_extra:
            raise RuntimeError("embed cannot run inside another forward of the same session.")
        self._in_embed = True
        try:
            self.model(**inputs, use_cache=False)
        except _Embedded as done:
            visual, layout = done.pending
            return done.embeds, visual, layout, done.positions
        finally:
            self._in_embed = False
            self._pending_visual = None
        raise RuntimeError("the model returned without calling its text backbone; vtc cannot embed its input.")

    # -- checks and statistics -----------------------------------------------------------------------
    @staticmethod
    def _check_unrecorded(cache: Any) -> None:
        """A cache whose layers hold different lengths was pruned; without its record its masks would be wrong."""
        if len(set(surface.layer_lengths(cache))) > 1:
            raise ValueError(
                "this KV cache was pruned by vtc (its layers hold different lengths) but carries no vtc record; "
                "pass the cache object the model returned, or a copy.deepcopy of it (copies keep the record)."
            )

    def _check_cache(self, cache: Any) -> None:
        if cache is None or not self.pipeline.prunes:
            return
        if not surface.is_dynamic_cache(cache):
            raise ValueError(
                f"vtc pruning needs a DynamicCache (layers keep different lengths); got {type(cache).__name__}. "
                f"Use the default cache (do not pass cache_implementation='static' or a StaticCache)."
            )
        if surface.has_sliding_layers(cache):
            raise ValueError(
                "vtc pruning does not support sliding-window cache layers; load the model with "
                "use_sliding_window=False (the default for Qwen2-VL)."
            )

    def _fill_layer_stats(self, fwd: Forward) -> None:
        tokens, visual, lengths = [], [], []
        for i in range(self.adapter.num_layers):
            _, n, v, length = [b for b in fwd.boundaries if b[0] <= i][-1]
            tokens.append(n)
            visual.append(v)
            lengths.append(length)
        self.stats.tokens_per_layer, self.stats.visual_per_layer, self.stats.seq_len_per_layer = tokens, visual, lengths
        if fwd.cache is not None:
            held = {s.start: s.state.num_tokens().tolist() for s in fwd.segments}
            self.stats.cache_tokens_per_layer = [held[fwd.segment_at(i).start] for i in range(self.adapter.num_layers)]
