"""The adapter base: finds a model's parts, installs vtc's hooks, and runs pruning stages.

vtc keeps the model's own code. Hooks on the multimodal model, the text backbone and its decoder layers
see each forward; pruning stages run at the input of their decoder layer during a prefill, and the
layers after a stage get compacted arguments (see ``vtc.adapters.segments``). Attention taps come from
a registered wrapper around the model's own attention function, switched on for the text model only,
so sdpa and flash keep running.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vtc import kernels, surface
from vtc.adapters.segments import (
    CacheRecord,
    Forward,
    Segment,
    boundary,
    fresh_positions,
    gather_tokens,
    plan_slots,
)
from vtc.errors import UnsupportedModelError
from vtc.method import AttentionCall, LayerContext, Selection, StepContext, VisionContext
from vtc.state import StageRecord, TokenStats, VisualTokenState

if TYPE_CHECKING:
    from vtc.compose import Pipeline
    from vtc.flops import ModelDims

# The attribute a pruned prefill's record lives in, on the KV cache object.
RECORD_ATTR = "_vtc_record"

# Attention modules whose calls a method taps, mapped to (layer index, callback); see _vtc_attention_for.
_TAPS: weakref.WeakKeyDictionary[nn.Module, tuple[int, Callable[[AttentionCall], None]]] = weakref.WeakKeyDictionary()
# Attention modules whose post-softmax weights a method edits, mapped to (layer index, callback).
_EDITS: weakref.WeakKeyDictionary[nn.Module, tuple[int, Callable[[AttentionCall], Any]]] = weakref.WeakKeyDictionary()

# Attention implementations under which an edit can rebuild the layer's weights from its mask.
EDITABLE_ATTENTION = ("sdpa", "eager")


def _edited_attention(
    module: nn.Module, query, key, value, attention_mask, scaling: float, edit: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one layer with post-softmax weights passed through `edit` (eager maths, this layer only).

    The mask is whatever the layer received: None (causal, sdpa's fast path), a bool mask (True = may
    attend, sdpa) or an additive float mask (eager).

    Returns:
        ``attn_output [B, Lq, Hq, D]`` and the edited weights ``[B, Hq, Lq, Lk]``, as eager attention does.
    """
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.float().transpose(2, 3)) * scaling  # [B, Hq, Lq, Lk]
    lq, lk = scores.shape[-2:]
    if attention_mask is None:
        rows = torch.arange(lq, device=scores.device)[:, None] + (lk - lq)
        allowed = torch.arange(lk, device=scores.device)[None, :] <= rows  # [Lq, Lk]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :lk], float("-inf"))
    else:
        scores = scores + attention_mask[..., :lk].float()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully hidden row (padding) attends nothing
    probs = edit(probs)
    out = torch.matmul(probs.to(v.dtype), v)  # [B, Hq, Lq, D]
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


class _PrepassDone(Exception):  # noqa: N818  (control flow, not an error)
    """Raised after the pre-pass's last layer to stop the backbone (caught by the adapter)."""


def _vtc_attention_for(original: str) -> Callable[..., Any]:
    """The vtc attention function wrapping `original` (an attention implementation name).

    It runs the model's own implementation unchanged, then hands the call to a tap if one is registered
    for the calling module. Registered under ``vtc_<original>`` so name checks such as "flash" in the
    implementation name keep working.
    """

    def vtc_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        impl = surface.attention_function(original, module)
        edit = _EDITS.get(module)
        fn = None
        if edit is not None:
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            fn = edit[1](AttentionCall(edit[0], query, key, value, attention_mask, scaling))
        if fn is not None:
            out = _edited_attention(module, query, key, value, attention_mask, scaling, fn)
        else:
            out = impl(module, query, key, value, attention_mask, **kwargs)
        tap = _TAPS.get(module)
        if tap is not None:
            layer, callback = tap
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            causal = getattr(module, "is_causal", True)
            callback(AttentionCall(layer, query, key, value, attention_mask, scaling, causal=causal))
        return out

    return vtc_attention


def _register_attention(original: str) -> str:
    """Register the vtc wrapper of `original` with transformers (attention and mask functions)."""
    name = f"vtc_{original}"
    if original not in surface.mask_implementations():
        raise ValueError(
            f"vtc cannot tap attention implementation {original!r}; load the model with "
            f"attn_implementation='sdpa' or 'eager' (or a flash-attention variant)."
        )
    surface.register_attention(name, _vtc_attention_for(original), masks_like=original)
    return name


class Adapter:
    """Base of the per-family adapters.

    A subclass names the ``model_types`` it serves, finds the parts in ``_find_parts`` and says how
    visual tokens are marked in ``visual_mask``. Everything that touches masks, positions and caches is
    here, shared by every family.

    Attributes:
        model: the wrapped ``*ForConditionalGeneration`` model.
        vlm: its multimodal base model (``model.model``).
        text_model: the text backbone (``LlamaModel``, ``Qwen2VLTextModel``, ...).
        layers: the text backbone's decoder layers.
        final_norm: the text backbone's final norm.
        lm_head: the output projection.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[frozenset[str]] = frozenset({"attn_tap", "final_norm"})

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._find_parts()
        self.text_config = self.text_model.config
        self.num_layers = len(self.layers)
        types = getattr(self.text_config, "layer_types", None)
        self._layer_types = list(types) if types else ["full_attention"] * self.num_layers
        self.stats = TokenStats(dims=self.dims())
        self._pipeline: Pipeline | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._original_attn: str | None = None
        self._pending_visual: torch.Tensor | None = None
        self._fwd: Forward | None = None
        self._in_prepass = False
        self._original_vision_attn: str | None = None
        self._tower_valid: torch.Tensor | None = None
        self._in_extra = False
        self._prefill_call = False

    # -- family-specific --------------------------------------------------------------------------
    #: The model class this adapter wraps, for error messages.
    model_class: ClassVar[str] = ""

    def _vision_parts(self, vlm: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The multimodal model's vision tower and projector."""
        raise NotImplementedError

    def _find_parts(self) -> None:
        """Find the multimodal model, text backbone, layers, final norm, LM head, tower and projector."""
        vlm = getattr(self.model, "model", None)
        try:
            if vlm is None or not hasattr(self.model, "lm_head"):
                raise AttributeError
            self.vision_tower, self.projector = self._vision_parts(vlm)
            self.text_model = vlm.language_model
        except AttributeError:
            raise UnsupportedModelError(
                f"vtc wraps {self.model_class}; got {type(self.model).__name__}. "
                f"Pass the model with the LM head (the one that has .generate)."
            ) from None
        self.vlm = vlm
        self.layers = self.text_model.layers
        self.final_norm = self.text_model.norm
        self.lm_head = self.model.lm_head

    def visual_token_ids(self) -> tuple[int, ...]:
        """Token ids of visual placeholders (image, and video where the family has it)."""
        raise NotImplementedError

    def dims(self) -> ModelDims:
        """Layer shapes for the FLOPs formula."""
        raise NotImplementedError

    def visual_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """``[B, L]`` true at visual placeholder positions of the multimodal model's input."""
        ids = self.visual_token_ids()
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        if inputs_embeds is None:
            raise ValueError("the model was called with neither input_ids nor inputs_embeds.")
        # As transformers does when only embeddings are given: compare with the placeholder embeddings.
        table = self.vlm.get_input_embeddings()
        marks = table(torch.tensor(ids, device=inputs_embeds.device)).to(inputs_embeds.dtype)  # [n_ids, d]
        return (inputs_embeds[:, :, None, :] == marks).all(dim=-1).any(dim=-1)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def visual_coords(self, visual: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """``[B, L, 4]`` (image, frame, row, column) of each visual token of a prefill; -1 elsewhere.

        Args:
            visual: ``[B, L]`` visual placeholders of the text backbone's input.
            kwargs: the text backbone's keyword arguments (position ids, for families that encode the
                grid there).
        """
        return None

    def _text_dims(self, vision: Any = None) -> ModelDims:
        """The decoder's shapes from the (standard) text config fields."""
        from vtc.flops import ModelDims

        c = self.text_config
        heads = c.num_attention_heads
        return ModelDims(
            name=getattr(self.model.config, "_name_or_path", "") or self.name,
            num_layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab=c.vocab_size,
            vision=vision,
        )

    @staticmethod
    def _linear_macs(module: nn.Module) -> int:
        """Multiply-adds per token of all linear layers in `module` (a projector applied per token)."""
        return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    def image_token_counts(self, visual: torch.Tensor) -> list[int]:
        """LLM visual tokens of each image in a batch: contiguous visual runs, split at fixed image sizes."""
        dims = self.stats.dims
        per_image = dims.vision.tokens_per_image if dims is not None and dims.vision is not None else None
        counts: list[int] = []
        for row in visual.cpu():
            zero = torch.zeros(1, dtype=torch.int)
            edges = torch.diff(row.int(), prepend=zero, append=zero)  # +1 where a run starts, -1 after it ends
            starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
            for run in (ends - starts).tolist():
                while per_image and run > per_image:
                    counts.append(per_image)
                    run -= per_image
                counts.append(run)
        return counts

    # -- installing -------------------------------------------------------------------------------
    def install(self, pipeline: Pipeline) -> None:
        """Install the hooks `pipeline` needs; ``uninstall`` undoes all of it."""
        self._pipeline = pipeline
        self._hooks.append(self.vlm.register_forward_pre_hook(self._on_vlm, with_kwargs=True))
        self._hooks.append(self.text_model.register_forward_pre_hook(self._on_text_start, with_kwargs=True))
        self._hooks.append(self.text_model.register_forward_hook(self._on_text_end, with_kwargs=True))
        # Layers from the first stage on get compacted arguments; a cache trim reaches back further.
        trim = [] if pipeline.cache_trim_from is None else [pipeline.cache_trim_from]
        first = min([*pipeline.stage_layers, *trim], default=self.num_layers)
        for i in range(first, self.num_layers):
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for i in pipeline.read_layers:  # after the layer hooks, so readers see the compacted input
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._reader_hook(i), with_kwargs=True))
        if pipeline.tap_layers or pipeline.edit_layers:
            original = surface.attention_implementation(self.text_config)
            if pipeline.edit_layers and original not in EDITABLE_ATTENTION:
                raise ValueError(
                    f"editing attention weights needs the model loaded with attn_implementation='sdpa' or "
                    f"'eager'; this one uses {original!r}."
                )
            surface.set_attention_implementation(self.text_config, _register_attention(original))
            self._original_attn = original
            for i in pipeline.tap_layers:
                _TAPS[self.attention_module(self.layers[i])] = (i, self._tap_callback)
            for i in pipeline.edit_layers:
                _EDITS[self.attention_module(self.layers[i])] = (i, self._edit_callback)
        if pipeline.output_methods:
            self._hooks.append(self.model.register_forward_hook(self._on_output, with_kwargs=True))
        self._install_vision(pipeline)

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in [*self.layers, *(self.vision_encoder_layers() or [])]:
            _TAPS.pop(self.attention_module(layer), None)
            _EDITS.pop(self.attention_module(layer), None)
        if self._original_attn is not None:
            surface.set_attention_implementation(self.text_config, self._original_attn)
            self._original_attn = None
        if self._original_vision_attn is not None:
            surface.set_attention_implementation(self.vision_tower.config, self._original_vision_attn)
            self._original_vision_attn = None
        self._tower_valid = None
        self._fwd = None
        self._pending_visual = None
        self._pipeline = None
        self._in_extra = False

    # -- hooks ------------------------------------------------------------------------------------
    def _on_vlm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending_visual = self.visual_mask(input_ids, kwargs.get("inputs_embeds"))

    def _on_text_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._in_prepass:
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError(
                "vtc wraps the multimodal model; call the model (or its generate), not its text backbone alone."
            )
        batch, length = embeds.shape[:2]
        cache = surface.get_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        use_cache = self.text_config.use_cache if use_cache is None else use_cache
        visual = self._pending_visual
        self._pending_visual = None
        if visual is None or visual.shape != (batch, length):
            visual = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
        user_mask = kwargs.get("attention_mask")
        self._check_cache(cache)
        if user_mask is not None and user_mask.dim() != 2 and self._pipeline.stage_layers:
            raise ValueError(
                "vtc needs the 2-D attention mask of shape [batch, length] (padding mask); a custom 4-D mask "
                "cannot be compacted after pruning. Pass the 2-D mask instead."
            )
        past = surface.cached_length(cache) if cache is not None else 0
        if not self._in_extra:
            self._prefill_call = past == 0
        if past == 0:
            if use_cache and cache is None:
                # The backbone would create this same cache itself; creating it here lets the pruned
                # prefill leave its record on it, so later forwards on the cache find it.
                cache = surface.new_cache(self.text_config)
                surface.set_cache(kwargs, self.text_model, cache)
            valid = user_mask.bool() if user_mask is not None else torch.ones_like(visual)
            state = VisualTokenState.initial(visual, valid, self.visual_coords(visual, kwargs))
            self._fwd = Forward(True, state, cache, [Segment(0, state)], prompt_len=length)
            self._fwd.boundaries.append(boundary(0, state))
            if not self._in_extra:  # a decoding method's extra forward keeps the stats and buffers
                self.stats = TokenStats(dims=self.stats.dims)
                self.stats.image_tokens = self.image_token_counts(visual)
                self._pipeline.on_forward_start()
            if self._pipeline.prepass_layer is not None:
                self._run_prepass(kwargs, self._pipeline.prepass_layer)
        else:
            record = getattr(cache, RECORD_ATTR, None) if cache is not None else None
            prunes = bool(self._pipeline.stage_layers) or self._pipeline.cache_trim_from is not None
            if record is None and cache is not None and prunes:
                self._check_unrecorded(cache)
            segments = record.segments if record is not None else [Segment(0, None)]
            for seg in segments:
                seg.reset_forward()
            positions = kwargs.get("position_ids")
            if positions is None:  # what the backbone will use: positions after the cached ones
                positions = (torch.arange(length, device=embeds.device) + past).expand(batch, length)
            self._fwd = Forward(False, None, cache, segments, user_mask, positions, record.prompt_len if record else 0)
            if not self._in_extra:
                self.stats.decode_steps += 1
        return args, kwargs

    def _on_text_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._in_prepass:
            return
        fwd, self._fwd = self._fwd, None
        if fwd is None or not fwd.prefill:
            return
        if fwd.cache is not None and self._pipeline.cache_trim_from is not None and len(fwd.segments) > 1:
            fwd.segments = self._trim_cache(fwd, self._pipeline.cache_trim_from)
        if fwd.cache is not None and any(seg.compacted for seg in fwd.segments):
            for seg in fwd.segments:
                seg.reset_forward()
            # On the cache object itself, so copies of the cache (copy.deepcopy) carry it along.
            setattr(fwd.cache, RECORD_ATTR, CacheRecord(fwd.prompt_len, fwd.segments))
        if self._pipeline.text_output_methods:
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self._pipeline.on_text_output(hidden, fwd.state)
        if not self._in_extra:
            self._fill_layer_stats(fwd)

    def _layer_hook(self, i: int) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            fwd = self._fwd
            if fwd is None or self._in_prepass:
                return args, kwargs
            hidden = args[0] if args else kwargs.pop(surface.HIDDEN_STATES)
            if fwd.prefill:
                hidden = self._run_stages(i, hidden, kwargs, fwd)
            seg = fwd.segment_at(i)
            if seg.compacted:
                self._segment_kwargs(seg, i, hidden, kwargs, fwd)
            return (hidden, *args[1:]), kwargs

        return hook

    def _reader_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            fwd = self._fwd
            if fwd is None or self._in_prepass:
                return
            hidden = args[0] if args else kwargs[surface.HIDDEN_STATES]
            self._pipeline.on_layer_input(LayerContext(i, hidden, fwd.state if fwd.prefill else None, self))

        return hook

    def _edit_callback(self, call: AttentionCall) -> Any:
        fwd = self._fwd
        if fwd is None or self._in_prepass:
            return None
        return self._pipeline.edit_attention(dataclasses.replace(call, state=fwd.state if fwd.prefill else None))

    @property
    def current_cache(self) -> Any:
        """The KV cache of the forward running now (None outside a forward or without a cache)."""
        return self._fwd.cache if self._fwd is not None else None

    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._in_extra:
            return None
        return self._pipeline.on_output(StepContext(kwargs, output, self._prefill_call, self))

    def run_extra(self, **kwargs: Any) -> Any:
        """Run the wrapped model once more inside a decoding step (e.g. an ensemble member).

        Pruning stages and attention edits run as usual; output methods do not (no recursion), and the
        forward counts in ``stats.extra_forwards`` rather than as a decode step.
        """
        if self._in_extra:
            raise RuntimeError("an extra forward cannot start another extra forward.")
        saved = self._fwd
        self._in_extra = True
        try:
            out = self.model(**kwargs)
        finally:
            self._in_extra = False
            self._fwd = saved
        self.stats.extra_forwards += 1
        return out

    def _tap_callback(self, call: AttentionCall) -> None:
        if self._fwd is not None and self._fwd.prefill:
            self._pipeline.on_attention(dataclasses.replace(call, state=self._fwd.state))

    def _run_prepass(self, kwargs: dict, last: int) -> None:
        """Run decoder layers 0..`last` on the full prefill, without cache, so taps see them first."""

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise _PrepassDone

        handle = self.layers[last].register_forward_hook(stop)
        self._in_prepass = True
        try:
            self.text_model(**surface.with_cache({**kwargs, "use_cache": False}, self.text_model, None))
        except _PrepassDone:
            pass
        finally:
            self._in_prepass = False
            handle.remove()
        counts = self._fwd.state.num_tokens().tolist()
        self.stats.prepass_tokens_per_layer = [counts] * (last + 1)

    # -- vision tower -----------------------------------------------------------------------------
    def vision_encoder_layers(self) -> nn.ModuleList | None:
        """The vision tower's transformer layers, where the family supports tower stages (else None)."""
        return None

    @property
    def vision_grid(self) -> int:
        """Patches per side of one image in the tower."""
        raise NotImplementedError

    @property
    def vision_has_cls(self) -> bool:
        return False

    def _install_vision(self, pipeline: Pipeline) -> None:
        layers = self.vision_encoder_layers()
        if layers is None:
            return
        pipeline.bind_vision(len(layers))
        if not (pipeline.vision_stage_layers or pipeline.vision_tap_layers):
            return
        self._hooks.append(self.vision_tower.register_forward_pre_hook(self._on_tower_start))
        first = min(pipeline.vision_stage_layers, default=len(layers))
        for i in range(first, len(layers)):
            self._hooks.append(layers[i].register_forward_pre_hook(self._tower_layer_hook(i), with_kwargs=True))
        if pipeline.vision_tap_layers:
            config = self.vision_tower.config
            original = surface.attention_implementation(config)
            surface.set_attention_implementation(config, _register_attention(original))
            self._original_vision_attn = original
            for i in pipeline.vision_tap_layers:
                _TAPS[self.attention_module(layers[i])] = (i, self._tower_tap)

    def _on_tower_start(self, module: nn.Module, args: tuple) -> None:
        self._tower_valid = None
        self._pipeline.on_vision_start()

    def _tower_layer_hook(self, i: int) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0]
            if self._tower_valid is None:
                self._tower_valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            for method in self._pipeline.vision_stages_at(i):
                ctx = VisionContext(i, hidden, self._tower_valid, self.vision_grid, self.vision_has_cls)
                sel = method.vision_select(ctx)
                if sel is None:
                    continue
                if sel.hidden is not None:
                    hidden = sel.hidden
                keep = sel.keep.clone()
                if self.vision_has_cls:
                    keep[:, 0] = True  # the CLS token is never dropped
                self._tower_valid = self._tower_valid & keep
            if bool(self._tower_valid.all()):
                return (hidden, *args[1:]), kwargs
            # Hidden tokens stop being keys: an additive mask on every later tower layer.
            floor = torch.finfo(hidden.dtype).min
            mask = torch.zeros(hidden.shape[0], 1, 1, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~self._tower_valid[:, None, None, :], floor)  # [N, 1, 1, T]
            given = args[1] if len(args) > 1 else kwargs.get(surface.ATTENTION_MASK)
            mask = mask if given is None else given + mask
            if len(args) > 1:
                return (hidden, mask, *args[2:]), kwargs
            return (hidden,), {**kwargs, surface.ATTENTION_MASK: mask}

        return hook

    def _tower_tap(self, call: AttentionCall) -> None:
        n, t = call.query.shape[0], call.query.shape[2]
        valid = self._tower_valid if self._tower_valid is not None else torch.ones(n, t, dtype=torch.bool)
        patches = torch.ones(n, t, dtype=torch.bool, device=valid.device)
        if self.vision_has_cls:
            patches[:, 0] = False
        state = VisualTokenState.initial(patches, valid.to(patches.device))
        self._pipeline.on_vision_attention(dataclasses.replace(call, state=state))

    # -- compaction -------------------------------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotary ``(cos, sin)`` of the text model for ``[B, L]`` positions (or the family's own layout)."""
        return surface.rotary(self.text_model, hidden, positions)

    def _run_stages(self, i: int, hidden: torch.Tensor, kwargs: dict, fwd: Forward) -> torch.Tensor:
        """Run the pruning stages at layer `i` and compact `hidden` to what they keep."""
        for method in self._pipeline.stages_at(i):
            state = fwd.state
            with kernels.record() as backends:
                sel = method.select(LayerContext(i, hidden, state, self))
            self.stats.backends.update(backends)
            if sel is None:
                continue
            if not isinstance(sel, Selection):
                sel = Selection(sel)
            if sel.hidden is not None:
                hidden = sel.hidden
            present = state.index >= 0
            keep = sel.keep & present
            if sel.scope == "visual":  # only visual tokens (and vtc's own padding slots) can go
                keep |= ~state.visual & present
            visual_before = state.num_visual().tolist()
            if bool((keep != present).any()):
                hidden, state = self._compact(i, hidden, keep, sel.positions, kwargs, fwd)
            self.stats.stages.append(
                StageRecord(
                    method.name, i, state.kept_visual(), state.kept_positions(), visual_before, state.kept_tokens()
                )
            )
        return hidden

    def _compact(
        self, i: int, hidden: torch.Tensor, keep: torch.Tensor, positions: str, kwargs: dict, fwd: Forward
    ) -> tuple[torch.Tensor, VisualTokenState]:
        """Gather the kept slots; start a new segment at layer `i` with its rotary embeddings."""
        slots, filled = plan_slots(keep)
        hidden = gather_tokens(hidden, slots) * filled[..., None].to(hidden.dtype)
        state = fwd.state = fwd.state.gather(slots, filled)
        current = fwd.segment_at(i)
        seg = Segment(i, state, compacted=True)
        if positions == "fresh":
            seg.cos_sin = self.rotary(hidden, fresh_positions(state.valid))
            seg.next_fresh = state.valid.sum(dim=1)
        else:
            # Chained from the tokens' current embeddings: original positions stay original, and tokens
            # an earlier stage renumbered keep their new numbers.
            source = current.cos_sin if current.compacted else kwargs[surface.POSITION_EMBEDDINGS]
            seg.cos_sin = tuple(gather_tokens(t, slots) for t in source)
            seg.next_fresh = current.next_fresh
        fwd.segments = [s for s in fwd.segments if s.start < i] + [seg]
        fwd.boundaries.append(boundary(i, state))
        return hidden, state

    def _trim_cache(self, fwd: Forward, start: int) -> list[Segment]:
        """Keep in the KV cache of layers `start`.. only the tokens of the last segment; return the segments.

        Every later stage only drops tokens, so the final tokens are a subset of each earlier segment's,
        found by their input positions (ascending in every segment).
        """
        final = fwd.segments[-1]
        ends = [s.start for s in fwd.segments[1:]] + [self.num_layers]
        target = final.state.index  # [B, Lf], -1 on padding slots
        for seg, end in zip(fwd.segments[:-1], ends[:-1], strict=True):
            layers = range(max(seg.start, start), end)
            if not layers:
                continue
            slots = torch.searchsorted(seg.state.index.contiguous(), target.contiguous())  # [B, Lf]
            slots = slots.clamp(max=seg.state.length - 1)
            filled = (target >= 0)[:, None, :, None]  # [B, 1, Lf, 1]
            for i in layers:
                keys, values = surface.layer_kv(fwd.cache, i)
                idx = slots[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
                surface.set_layer_kv(fwd.cache, i, keys.gather(2, idx) * filled, values.gather(2, idx) * filled)
        kept = [s for s in fwd.segments if s.start < start]
        tail = Segment(start, final.state, compacted=True, next_fresh=final.next_fresh, shift=final.shift)
        return [*kept, tail]

    def _segment_kwargs(self, seg: Segment, i: int, hidden: torch.Tensor, kwargs: dict, fwd: Forward) -> None:
        """Replace layer `i`'s mask, rotary embeddings and position ids with the segment's."""
        if not fwd.prefill and seg.next_fresh is not None and seg.cos_sin is None:
            seg.cos_sin = self._renumbered_cos_sin(seg, hidden, fwd.positions)
        if seg.cos_sin is not None:
            kwargs[surface.POSITION_EMBEDDINGS] = seg.cos_sin
        # Kept positions have gaps; position ids would read as packed sequences to flash attention,
        # and no layer needs them once the rotary embeddings are set.
        if surface.POSITION_IDS in kwargs:
            kwargs[surface.POSITION_IDS] = None
        kind = self._layer_types[i]
        if kind not in seg.masks:
            seg.masks[kind] = self._segment_mask(seg, i, kind, hidden, fwd)
        kwargs[surface.ATTENTION_MASK] = seg.masks[kind]

    def _renumbered_cos_sin(self, seg: Segment, hidden: torch.Tensor, positions: torch.Tensor) -> tuple:
        """Rotary embeddings of new tokens in a renumbered segment: the caller's positions, shifted."""
        if seg.shift is None:  # the first forward after the prefill fixes the offset per row
            seg.shift = positions[..., :1] - seg.next_fresh[:, None]
        return self.rotary(hidden, positions - seg.shift)

    def _segment_mask(self, seg: Segment, i: int, kind: str, hidden: torch.Tensor, fwd: Forward) -> Any:
        """Build the mask of compacted layer `i` (before its cache update) with transformers' mask functions."""
        prompt_valid = seg.state.valid  # [B, L_seg]
        if fwd.prefill:
            mask2d = prompt_valid
        else:
            if fwd.user_mask is not None:  # the caller may hide prompt tokens in later forwards too
                prompt_cols = fwd.user_mask[:, : fwd.prompt_len].bool()
                prompt_valid = prompt_valid & prompt_cols.gather(1, seg.state.index.clamp(min=0))
            cached = surface.cached_length(fwd.cache, i)
            new = cached - seg.state.length + hidden.shape[1]  # generated tokens so far + this forward's
            if fwd.user_mask is not None:
                tail = fwd.user_mask[:, fwd.prompt_len :].bool()
                if tail.shape[1] != new:
                    raise ValueError(
                        f"the attention mask has {fwd.user_mask.shape[1]} columns but the pruned prompt "
                        f"({fwd.prompt_len} tokens) plus {new} new tokens need {fwd.prompt_len + new}."
                    )
            else:
                tail = torch.ones(hidden.shape[0], new, dtype=torch.bool, device=hidden.device)
            mask2d = torch.cat([prompt_valid, tail], dim=1)
        return surface.causal_mask(
            self.text_config,
            hidden,
            None if bool(mask2d.all()) else mask2d,
            fwd.cache,
            i if fwd.cache is not None else None,
            sliding=kind == "sliding_attention",
        )

    @staticmethod
    def _check_unrecorded(cache: Any) -> None:
        """A cache whose layers hold different lengths was pruned; without its record its masks would be wrong."""
        lengths = set(surface.layer_lengths(cache))
        if len(lengths) > 1:
            raise ValueError(
                "this KV cache was pruned by vtc (its layers hold different lengths) but carries no vtc record; "
                "pass the cache object the model returned, or a copy.deepcopy of it (copies keep the record)."
            )

    def _check_cache(self, cache: Any) -> None:
        if cache is None or not self._pipeline.stage_layers:
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

    # -- stats ------------------------------------------------------------------------------------
    def _fill_layer_stats(self, fwd: Forward) -> None:
        tokens, visual, lengths = [], [], []
        bounds = fwd.boundaries
        for i in range(self.num_layers):
            _, n, v, length = [b for b in bounds if b[0] <= i][-1]
            tokens.append(n)
            visual.append(v)
            lengths.append(length)
        self.stats.tokens_per_layer, self.stats.visual_per_layer, self.stats.seq_len_per_layer = tokens, visual, lengths
        if fwd.cache is not None:
            held = {s.start: s.state.num_tokens().tolist() for s in fwd.segments}
            self.stats.cache_tokens_per_layer = [held[fwd.segment_at(i).start] for i in range(self.num_layers)]

    # -- tiny models for tests and demos ----------------------------------------------------------
    @classmethod
    def tiny_model(cls, *, seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa", **kw: Any):
        """A small random model of this family, built in process (no download)."""
        raise NotImplementedError

    @classmethod
    def make_samples(cls, model: nn.Module, *, batch: int = 2, seed: int = 0, images: list[int] | None = None):
        """Unpadded single-row inputs of different prompt lengths (``images[i]`` images in row i)."""
        raise NotImplementedError

    @classmethod
    def collate(cls, model: nn.Module, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch samples with left padding, as a processor with ``padding_side='left'`` would."""
        raise NotImplementedError
