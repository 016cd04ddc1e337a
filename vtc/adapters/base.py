"""The adapter base: finds a model's parts, installs vtc's hooks, and compacts token sequences.

Compaction is the one risky step of visual-token pruning in a Hugging Face model, and it lives here,
once, for every family. The text backbone computes the attention mask and the rotary position
embeddings once per forward for its full input; decoder layers are then called one by one. vtc keeps
the model's own code and rewrites only the arguments of the layers after a pruning stage:

* hidden states are gathered to the kept tokens (rows keeping fewer tokens are left-padded with
  masked slots, so a batch row computes what it would compute alone);
* rotary embeddings are gathered from the full-length ones at each kept token's *original* input
  position, so positions (1-D, or Qwen's M-RoPE rows) are exactly what the unpruned model used;
* the attention mask is rebuilt with transformers' own mask function for the compacted sequence,
  sized from that layer's KV cache (layers before a stage cache more tokens than layers after it).

Each pruned prefill leaves a ``_CacheRecord`` keyed on its cache object. Later forwards on that cache
(decode steps, or several new tokens) rebuild each compacted segment's mask from the record, so stock
``generate`` and hand-written loops work with any batch size and padding.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vtc import kernels
from vtc.method import AttentionCall, LayerContext
from vtc.state import StageRecord, TokenStats, VisualTokenState

if TYPE_CHECKING:
    from vtc.compose import Pipeline
    from vtc.flops import ModelDims

# Attention modules whose calls a method taps, mapped to the callback (see ``_vtc_attention``).
_TAPS: weakref.WeakKeyDictionary[nn.Module, Callable[[AttentionCall], None]] = weakref.WeakKeyDictionary()


def _vtc_attention_for(original: str) -> Callable[..., Any]:
    """The vtc attention function wrapping `original` (an attention implementation name).

    It runs the model's own implementation unchanged, then hands the call to a tap if one is registered
    for the calling module. Registered under ``vtc_<original>`` so name checks such as "flash" in the
    implementation name keep working.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def vtc_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        if original == "eager":
            impl = sys.modules[type(module).__module__].eager_attention_forward
        else:
            impl = ALL_ATTENTION_FUNCTIONS[original]
        out = impl(module, query, key, value, attention_mask, **kwargs)
        tap = _TAPS.get(module)
        if tap is not None:
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            tap(AttentionCall(module.layer_idx, query, key, value, attention_mask, scaling))
        return out

    return vtc_attention


def _register_attention(original: str) -> str:
    """Register the vtc wrapper of `original` with transformers (attention and mask functions)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = f"vtc_{original}"
    if original not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(
            f"vtc cannot tap attention implementation {original!r}; load the model with "
            f"attn_implementation='sdpa' or 'eager' (or a flash-attention variant)."
        )
    AttentionInterface.register(name, _vtc_attention_for(original))
    # Without a mask function of the same name transformers builds no mask at all (silently non-causal).
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[..., b, index[b], :]`` for ``x`` of shape ``[..., B or 1, L, d]`` and ``index`` ``[B, L']``."""
    batch, width = index.shape
    x = x.expand(*x.shape[:-3], batch, *x.shape[-2:])
    idx = index.clamp(min=0)[..., None].expand(batch, width, x.shape[-1])  # [B, L', d]
    return x.gather(-2, idx.expand(*x.shape[:-3], batch, width, x.shape[-1]))


def plan_slots(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the compacted sequence: kept positions in order, rows left-padded to one length.

    Args:
        keep: ``[B, L]`` true for slots to keep.

    Returns:
        ``slots [B, L']`` indices into the current sequence and ``filled [B, L']`` (false for padding),
        with ``L'`` the largest kept count. Padding goes on the left so the last slot stays the last token.
    """
    length = keep.shape[1]
    width = int(keep.sum(dim=1).max().item())
    pos = torch.arange(length, device=keep.device)
    ordered = torch.where(keep, pos, -1).sort(dim=1).values  # dropped (-1) first, then kept ascending
    slots = ordered[:, length - width :]
    return slots, slots >= 0


@dataclasses.dataclass
class _Segment:
    """A run of decoder layers that all see (and cache) the same token set.

    Attributes:
        start: the first decoder layer of the run.
        state: the tokens those layers see, relative to the prefill's input (None: not known).
        compacted: the layers see fewer tokens than the input, so vtc rewrites their arguments.
        position_embeddings: ``(cos, sin)`` gathered for those tokens (prefill only).
        masks: layer type -> attention mask for the current forward.
    """

    start: int
    state: VisualTokenState | None
    compacted: bool = False
    position_embeddings: tuple[torch.Tensor, ...] | None = None
    masks: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _CacheRecord:
    """What a pruned prefill left in a KV cache: the prompt length and the compacted segments."""

    prompt_len: int
    segments: list[_Segment]


@dataclasses.dataclass
class _Forward:
    """Bookkeeping of the text-backbone forward in progress."""

    prefill: bool
    state: VisualTokenState | None
    cache: Any
    segments: list[_Segment]
    user_mask: torch.Tensor | None = None
    prompt_len: int = 0
    boundaries: list[tuple[int, list[int], list[int], int]] = dataclasses.field(default_factory=list)


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
        self._records: weakref.WeakKeyDictionary[Any, _CacheRecord] = weakref.WeakKeyDictionary()
        self._pending_visual: torch.Tensor | None = None
        self._fwd: _Forward | None = None

    # -- family-specific --------------------------------------------------------------------------
    def _find_parts(self) -> None:
        """Set ``vlm``, ``text_model``, ``layers``, ``final_norm``, ``lm_head``, ``vision_tower``."""
        raise NotImplementedError

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
        first = min(pipeline.stage_layers, default=self.num_layers)
        for i in range(first, self.num_layers):
            self._hooks.append(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        if pipeline.tap_layers:
            original = self.text_config._attn_implementation or "eager"
            self.text_config._attn_implementation = _register_attention(original)
            self._original_attn = original
            for i in pipeline.tap_layers:
                _TAPS[self.attention_module(self.layers[i])] = self._tap_callback

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in self.layers:
            _TAPS.pop(self.attention_module(layer), None)
        if self._original_attn is not None:
            self.text_config._attn_implementation = self._original_attn
            self._original_attn = None
        self._records = weakref.WeakKeyDictionary()
        self._fwd = None
        self._pending_visual = None
        self._pipeline = None

    # -- hooks ------------------------------------------------------------------------------------
    def _on_vlm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._pending_visual = self.visual_mask(input_ids, kwargs.get("inputs_embeds"))

    def _on_text_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError(
                "vtc wraps the multimodal model; call the model (or its generate), not its text backbone alone."
            )
        batch, length = embeds.shape[:2]
        cache = kwargs.get("past_key_values")
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
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            if use_cache and cache is None:
                from transformers import DynamicCache

                # The backbone would create this same cache itself; creating it here lets the pruned
                # prefill leave its record on it, so later forwards on the cache find it.
                cache = DynamicCache(config=self.text_config)
                kwargs["past_key_values"] = cache
            valid = user_mask.bool() if user_mask is not None else torch.ones_like(visual)
            state = VisualTokenState.initial(visual, valid)
            self._fwd = _Forward(True, state, cache, [_Segment(0, state)], prompt_len=length)
            self._fwd.boundaries.append(self._boundary(0, state))
            self.stats = TokenStats(dims=self.stats.dims)
            self.stats.image_tokens = self.image_token_counts(visual)
            self._pipeline.on_forward_start()
        else:
            record = self._records.get(cache) if cache is not None else None
            segments = record.segments if record is not None else [_Segment(0, None)]
            prompt_len = record.prompt_len if record is not None else 0
            self._fwd = _Forward(False, None, cache, segments, user_mask=user_mask, prompt_len=prompt_len)
            for seg in segments:
                seg.masks = {}
            self.stats.decode_steps += 1
        return args, kwargs

    def _on_text_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fwd, self._fwd = self._fwd, None
        if fwd is None or not fwd.prefill:
            return
        if fwd.cache is not None and any(seg.compacted for seg in fwd.segments):
            for seg in fwd.segments:
                seg.position_embeddings, seg.masks = None, {}
            self._records[fwd.cache] = _CacheRecord(fwd.prompt_len, fwd.segments)
        self._fill_layer_stats(fwd)

    def _layer_hook(self, i: int) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            fwd = self._fwd
            if fwd is None:
                return args, kwargs
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if fwd.prefill:
                hidden = self._run_stages(i, hidden, kwargs, fwd)
            seg = self._segment_at(fwd.segments, i)
            if seg.compacted:
                self._segment_kwargs(seg, i, hidden, kwargs, fwd)
            return (hidden, *args[1:]), kwargs

        return hook

    def _tap_callback(self, call: AttentionCall) -> None:
        if self._fwd is not None and self._fwd.prefill:
            self._pipeline.on_attention(dataclasses.replace(call, state=self._fwd.state))

    # -- compaction -------------------------------------------------------------------------------
    def _run_stages(self, i: int, hidden: torch.Tensor, kwargs: dict, fwd: _Forward) -> torch.Tensor:
        """Run the pruning stages at layer `i` and compact `hidden` to what they keep."""
        for method in self._pipeline.stages_at(i):
            state = fwd.state
            with kernels.record() as backends:
                keep = method.select(LayerContext(i, hidden, state, self))
            self.stats.backends.update(backends)
            if keep is None:
                continue
            present = state.index >= 0
            keep = (keep | ~state.visual) & present  # only visual tokens (and vtc's own slots) can go
            visual_before = state.num_visual().tolist()
            if bool((keep != present).any()):
                slots, filled = plan_slots(keep)
                hidden = gather_tokens(hidden, slots) * filled[..., None].to(hidden.dtype)
                state = fwd.state = state.gather(slots, filled)
                # Rotary embeddings come from the full-length ones at each token's original position.
                cos_sin = tuple(gather_tokens(t, state.index) for t in kwargs["position_embeddings"])
                fwd.segments = [s for s in fwd.segments if s.start < i] + [_Segment(i, state, True, cos_sin)]
                fwd.boundaries.append(self._boundary(i, state))
            self.stats.stages.append(
                StageRecord(method.name, i, state.kept_visual(), state.kept_positions(), visual_before)
            )
        return hidden

    def _segment_kwargs(self, seg: _Segment, i: int, hidden: torch.Tensor, kwargs: dict, fwd: _Forward) -> None:
        """Replace layer `i`'s mask, rotary embeddings and position ids with the segment's."""
        if fwd.prefill:
            kwargs["position_embeddings"] = seg.position_embeddings
        # Original positions have gaps; position ids would read as packed sequences to flash attention,
        # and no layer needs them once the rotary embeddings are set.
        if "position_ids" in kwargs:
            kwargs["position_ids"] = None
        kind = self._layer_types[i]
        if kind not in seg.masks:
            seg.masks[kind] = self._segment_mask(seg, i, kind, hidden, fwd)
        kwargs["attention_mask"] = seg.masks[kind]

    def _segment_mask(self, seg: _Segment, i: int, kind: str, hidden: torch.Tensor, fwd: _Forward) -> Any:
        """Build the mask of compacted layer `i` (before its cache update) with transformers' mask functions."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        prompt_valid = seg.state.valid  # [B, L_seg]
        if fwd.prefill:
            mask2d = prompt_valid
        else:
            cached = fwd.cache.layers[i].get_seq_length()
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
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        return make(
            config=self.text_config,
            inputs_embeds=hidden,
            attention_mask=None if bool(mask2d.all()) else mask2d,
            past_key_values=fwd.cache,
            position_ids=None,
            layer_idx=i if fwd.cache is not None else None,
        )

    @staticmethod
    def _segment_at(segments: list[_Segment], i: int) -> _Segment:
        return [s for s in segments if s.start <= i][-1]

    def _check_cache(self, cache: Any) -> None:
        if cache is None or not self._pipeline.stage_layers:
            return
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"vtc pruning needs a DynamicCache (layers keep different lengths); got {type(cache).__name__}. "
                f"Use the default cache (do not pass cache_implementation='static' or a StaticCache)."
            )
        if any(getattr(cache, "is_sliding", ())):
            raise ValueError(
                "vtc pruning does not support sliding-window cache layers; load the model with "
                "use_sliding_window=False (the default for Qwen2-VL)."
            )

    # -- stats ------------------------------------------------------------------------------------
    @staticmethod
    def _boundary(layer: int, state: VisualTokenState) -> tuple[int, list[int], list[int], int]:
        return layer, state.num_tokens().tolist(), state.num_visual().tolist(), state.length

    def _fill_layer_stats(self, fwd: _Forward) -> None:
        tokens, visual, lengths = [], [], []
        bounds = fwd.boundaries
        for i in range(self.num_layers):
            _, n, v, length = [b for b in bounds if b[0] <= i][-1]
            tokens.append(n)
            visual.append(v)
            lengths.append(length)
        self.stats.tokens_per_layer, self.stats.visual_per_layer, self.stats.seq_len_per_layer = tokens, visual, lengths

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
