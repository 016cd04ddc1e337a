"""The transformers surface: the one module of vtc that touches transformers internals.

transformers changes its internals between minor releases: 5.24 renamed the ``past_key_values``
argument of decoder layers, attention modules, text models and mask functions to ``cache`` (with a
shim that maps the old name until 5.40), renamed the output field the same way, and rebuilt the
multimodal output classes. vtc reads and calls internals on purpose (that is how it prunes without
forking modeling code), so every such contact lives here, and the rest of vtc asks this module:

- the cache argument of a forward and the cache field of an output, under either spelling;
- the KV cache: creating one, its per-layer keys and values, lengths, cropping;
- transformers' mask functions (``create_causal_mask`` and its sliding-window twin);
- ``AttentionInterface`` / ``AttentionMaskInterface`` and the attention implementation of a config;
- the decoder layers' argument names and the text model's rotary embedding;
- for processors built without torchvision (the video side of Qwen2-VL, LLaVA-OneVision, LLaVA-NeXT-Video):
  Qwen's ``smart_resize``, video clip metadata, a checkpoint's files, and a processor whose video part is
  not transformers' own class; the message a forward raises when placeholders and media features differ.

Names are found by inspecting signatures, not by comparing version numbers, so a release that keeps the
shape of the surface works whatever its number. ``check`` runs at ``vtc.wrap``: a surface it does not
recognise raises ``UnsupportedTransformersError`` naming the installed version and the tested range
before any forward runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from vtc.errors import UnsupportedTransformersError

logger = logging.getLogger(__name__)

#: The oldest and the newest transformers release vtc's CI runs on (the floor is pyproject.toml's).
TESTED_FLOOR = "5.17.0"
TESTED_NEWEST = "5.24.0"

#: Spellings of the KV-cache argument and output field, newest first: 5.24 renamed ``past_key_values``.
CACHE_NAMES = ("cache", "past_key_values")

# Keyword arguments of a decoder layer that vtc replaces after a pruning stage.
HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
POSITION_EMBEDDINGS = "position_embeddings"
LAYER_ARGUMENTS = (HIDDEN_STATES, ATTENTION_MASK, POSITION_IDS, POSITION_EMBEDDINGS)

#: Keyword arguments that bring images or videos into a multimodal forward. From 5.24 ``generate`` encodes
#: the media before the loop and passes ``mm_encoder_outputs`` (a dict per modality) instead of pixels.
MEDIA_INPUTS = ("pixel_values", "pixel_values_videos", "pixel_values_images", "mm_encoder_outputs")


def version() -> str:
    import transformers

    return transformers.__version__


def tested_range() -> str:
    return f"{TESTED_FLOOR} to {TESTED_NEWEST}"


def unsupported(what: str) -> UnsupportedTransformersError:
    """The error for a surface vtc does not recognise: what moved, the versions, and the way out."""
    return UnsupportedTransformersError(
        f"vtc does not recognise the internals of the installed transformers {version()}: {what}. "
        f"vtc is tested with transformers {tested_range()}. Install a tested release "
        f"(pip install 'transformers>={TESTED_FLOOR},<={TESTED_NEWEST}') or upgrade vtc (pip install -U vtc-vlm)."
    )


# -- argument names ---------------------------------------------------------------------------------
def _forward_of(target: Callable | nn.Module) -> Callable:
    return type(target).forward if isinstance(target, nn.Module) else target


@functools.lru_cache(maxsize=256)
def _parameters(fn: Callable) -> frozenset[str]:
    """Parameter names of `fn`, looking through decorators that keep ``__wrapped__`` (deprecate_kwarg)."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_arg(target: Callable | nn.Module, label: str | None = None) -> str:
    """The name under which `target` (a module's forward, or a function) takes the KV cache.

    Args:
        target: a module (its class's ``forward`` is read) or a function.
        label: how an error names `target` (default: its class or qualified name).
    """
    names = _parameters(_forward_of(target))
    for name in CACHE_NAMES:
        if name in names:
            return name
    if label is None:
        label = f"{type(target).__name__}.forward" if isinstance(target, nn.Module) else target.__qualname__
    raise unsupported(f"{label} takes no KV-cache argument named {' or '.join(CACHE_NAMES)}")


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache in a forward's keyword arguments, under either spelling (the new one wins, as in 5.24)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def set_cache(kwargs: dict[str, Any], target: Callable | nn.Module, cache: Any) -> dict[str, Any]:
    """Put `cache` into `kwargs` (in place) under the name `target` takes, removing any other spelling."""
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    kwargs[cache_arg(target)] = cache
    return kwargs


def cache_kwargs(target: Callable | nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for calling `target`: ``model(**inputs, **cache_kwargs(model, cache))``."""
    return {cache_arg(target): cache}


def with_cache(kwargs: dict[str, Any], target: Callable | nn.Module, cache: Any) -> dict[str, Any]:
    """A copy of `kwargs` whose KV cache is `cache`, under the name `target` takes."""
    return set_cache(dict(kwargs), target, cache)


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    if dataclasses.is_dataclass(output):
        fields = {f.name for f in dataclasses.fields(output)}
        for name in CACHE_NAMES:
            if name in fields:
                return getattr(output, name)
        return None
    if isinstance(output, dict):
        return get_cache(output)
    return None


def last_hidden_state(output: Any) -> torch.Tensor:
    """The last hidden states ``[B, L, d]`` a text model's output carries (after its final norm)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def text_final_norm(text_model: nn.Module) -> nn.Module:
    """A language model's final norm (the module whose output the LM head reads)."""
    return text_model.norm


def carries_media(kwargs: dict[str, Any]) -> bool:
    """Whether a multimodal forward's arguments bring any image or video: without them the model embeds
    placeholder ids as ordinary tokens (a decode step may sample one), and so must vtc."""
    for name in MEDIA_INPUTS:
        value = kwargs.get(name)
        if isinstance(value, dict):
            if any(v is not None for v in value.values()):
                return True
        elif value is not None:
            return True
    return False


def carries_video(kwargs: dict[str, Any]) -> bool:
    """Whether a multimodal forward's (or generate's) arguments bring a video's pixels."""
    return kwargs.get("pixel_values_videos") is not None


def position_rows(positions: torch.Tensor) -> torch.Tensor:
    """Position ids as the rotary embedding reads them: M-RoPE's ``[3, B, L]`` without the text row that
    transformers puts first in its 4-row form (``[4, B, L]``); ``[B, L]`` and 3-row ids as they are."""
    return positions[1:] if positions.dim() == 3 and positions.shape[0] == 4 else positions


# -- the KV cache -----------------------------------------------------------------------------------
def new_cache(config: Any) -> Any:
    """An empty dynamic cache, as the text backbone would make it for `config`."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def is_dynamic_cache(cache: Any) -> bool:
    from transformers import DynamicCache

    return isinstance(cache, DynamicCache)


def has_sliding_layers(cache: Any) -> bool:
    return any(getattr(cache, "is_sliding", ()))


def num_cache_layers(cache: Any) -> int:
    return len(cache.layers)


def layer_kv(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `i`'s ``keys, values``, each ``[B, Hkv, L, D]`` (post-RoPE keys)."""
    layer = cache.layers[i]
    return layer.keys, layer.values


def set_layer_kv(cache: Any, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace layer `i`'s keys and values (for example with a gathered subset of their tokens)."""
    layer = cache.layers[i]
    layer.keys, layer.values = keys, values


def cached_length(cache: Any, i: int = 0) -> int:
    """Tokens layer `i` of `cache` holds."""
    return cache.layers[i].get_seq_length()


def layer_lengths(cache: Any) -> list[int]:
    """Tokens each layer holds (a cache vtc pruned holds fewer in its later layers)."""
    return [layer.get_seq_length() for layer in getattr(cache, "layers", [])]


def layer_parts(cache: Any, i: int) -> tuple[list[Any], list[Any]]:
    """Layer `i`'s keys and values as runs of tokens, oldest first: dense ``[B, Hkv, n, D]`` tensors and
    packed stores (see ``pack_layer``). A plain layer is one dense run each."""
    layer = cache.layers[i]
    parts = getattr(layer, "_vtc_parts", None)
    if parts is not None:
        return list(parts["keys"]), list(parts["values"])
    return [layer.keys], [layer.values]


def pack_layer(cache: Any, i: int, keys: list[Any], values: list[Any]) -> None:
    """Make layer `i` hold its tokens as `keys` / `values` runs (oldest first) instead of two dense tensors.

    A run is a dense ``[B, Hkv, n, D]`` tensor or a packed store: an object with ``length`` (tokens),
    ``nbytes`` (bytes held) and ``unpack()`` (the ``[B, Hkv, length, D]`` values it stands for). The layer
    stays a transformers dynamic cache layer: ``update`` appends new tokens densely and hands attention
    every run unpacked (so decoding reads the packed tokens' values, dequantized on the way, and the
    packed bytes are all the cache keeps of them); anything that assigns ``keys`` / ``values`` (a crop,
    a beam reorder, an eviction) makes the layer dense again, with the values it stood for.
    """
    layer = cache.layers[i]
    if not isinstance(layer, _packed_layer_class()):
        packed = _packed_layer_class()(layer)
        cache.layers[i] = packed
        layer = packed
    layer._vtc_parts = {"keys": list(keys), "values": list(values)}


def layer_nbytes(cache: Any, i: int) -> int:
    """Bytes layer `i` of `cache` holds for its keys and values (packed runs count their packed bytes)."""
    keys, values = layer_parts(cache, i)
    return sum(_run_nbytes(p) for p in (*keys, *values))


def _run_nbytes(run: Any) -> int:
    if isinstance(run, torch.Tensor):
        return run.numel() * run.element_size()
    return 0 if run is None else int(run.nbytes)


def _run_length(run: Any) -> int:
    if isinstance(run, torch.Tensor):
        return run.shape[-2] if run.dim() == 4 else 0
    return int(run.length)


def _unpack_run(run: Any) -> torch.Tensor:
    return run if isinstance(run, torch.Tensor) else run.unpack()


@functools.cache
def _packed_layer_class() -> type:
    """A ``DynamicLayer`` whose tokens are runs, some packed (``pack_layer``); made on first use."""
    from transformers.cache_utils import DynamicLayer

    def read(name: str) -> Callable[[Any], Any]:
        def get(self: Any) -> torch.Tensor | None:
            runs = self._vtc_parts[name]
            if not runs:
                return None
            unpacked = [_unpack_run(r) for r in runs if _run_length(r)]
            if not unpacked:
                return runs[0]
            return unpacked[0] if len(unpacked) == 1 else torch.cat(unpacked, dim=-2)

        def put(self: Any, value: torch.Tensor | None) -> None:
            self._vtc_parts[name] = [] if value is None else [value]

        return property(get, put)

    class PackedLayer(DynamicLayer):
        keys = read("keys")
        values = read("values")

        def __init__(self, layer: Any) -> None:
            self._vtc_parts = {"keys": [layer.keys], "values": [layer.values]}
            for name, value in vars(layer).items():
                if name not in ("keys", "values"):
                    setattr(self, name, value)

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            for name, new in (("keys", key_states), ("values", value_states)):
                runs = self._vtc_parts[name]
                if runs and isinstance(runs[-1], torch.Tensor):
                    runs[-1] = torch.cat([runs[-1], new], dim=-2) if _run_length(runs[-1]) else new
                else:
                    runs.append(new)
            self.is_initialized = True
            self.device = key_states.device
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return sum(_run_length(r) for r in self._vtc_parts["keys"])

    return PackedLayer


def crop_cache(cache: Any, max_length: int) -> None:
    """Keep the first `max_length` tokens of every layer (negative: drop that many from the end)."""
    cache.crop(max_length)


# -- masks ------------------------------------------------------------------------------------------
def causal_mask(
    config: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any, layer_idx: int | None,
    *, sliding: bool = False,
) -> Any:  # fmt: skip
    """The mask transformers would build for one layer: its attention implementation's form, from the
    2-D padding mask and that layer's cache (which may hold fewer tokens than other layers')."""
    from transformers import masking_utils

    make = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    return make(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=None,
        layer_idx=layer_idx,
        **{cache_arg(make): cache},
    )


# -- attention implementations ----------------------------------------------------------------------
def attention_implementation(config: Any) -> str:
    """The attention implementation a (sub-)config selects; ``eager`` when unset."""
    return config._attn_implementation or "eager"


def set_attention_implementation(config: Any, name: str) -> None:
    """Switch a (sub-)config's attention implementation; the modules read it at each call."""
    config._attn_implementation = name


def mask_implementations() -> dict[str, Callable]:
    """transformers' own mask functions, by attention implementation name (not user registrations)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return dict(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


def attention_function(name: str, module: nn.Module) -> Callable:
    """The attention function `module` runs under implementation `name` (eager is its modeling file's own)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def register_attention(name: str, fn: Callable, *, masks_like: str) -> None:
    """Register `fn` as attention implementation `name`, with the mask function of `masks_like`.

    Without a mask function of the same name transformers builds no mask at all, so the function would
    get ``attention_mask=None`` (silently non-causal).
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    masks = mask_implementations()
    if masks_like not in masks:
        raise ValueError(f"{masks_like!r} is not an attention implementation transformers builds masks for.")
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, masks[masks_like])


# -- rotary embeddings ------------------------------------------------------------------------------
def rotary(text_model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The text model's rotary ``(cos, sin)`` at `positions` (``[B, L]``, or ``[3, B, L]`` for M-RoPE)."""
    return text_model.rotary_emb(hidden, positions)


def mrope_positions(vlm: nn.Module, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, **grids: Any) -> Any:
    """Qwen-VL's M-RoPE position ids ``[3, B, L]`` of a whole sequence (``image_grid_thw=``,
    ``video_grid_thw=``, ``attention_mask=``), for callers that feed it in pieces and pass positions."""
    positions, _ = vlm.get_rope_index(input_ids, mm_token_type_ids, **grids)
    return positions


# -- processors -------------------------------------------------------------------------------------
def qwen_smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of `factor`, area within the pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def video_metadata(frames: int) -> Any:
    """Metadata of a clip given as arrays: only its frame count (transformers then assumes 24 fps)."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=frames)


def checkpoint_text(source: str, name: str) -> str | None:
    """The text of file `name` of a checkpoint (a folder or a cached hub id), or None if it has none."""
    from pathlib import Path

    from transformers.utils import cached_file

    path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    return Path(path).read_text(encoding="utf-8") if path else None


def processor_with_video_part(cls: type, video_processor: Any, **parts: Any) -> Any:
    """``cls(**parts, video_processor=...)``, accepting a video processor that is not transformers' class
    (or None), which ``ProcessorMixin``'s argument check refuses; the result is an instance of `cls`."""
    try:
        return cls(**parts, video_processor=video_processor)
    except (TypeError, ValueError, AttributeError):
        pass

    class Lenient(cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    processor = Lenient(**parts, video_processor=video_processor)
    processor.__class__ = cls  # behave (and save) as the real class
    return processor


#: How transformers' multimodal forwards say the placeholders of a prompt and the features of its media
#: differ ("Video features and video tokens do not match, tokens: 16, features: 17").
PLACEHOLDER_MISMATCH = ("features and image tokens do not match", "features and video tokens do not match")


def is_placeholder_mismatch(error: BaseException) -> bool:
    """Whether `error` is a forward's complaint that placeholders and media features differ in number."""
    return isinstance(error, ValueError) and any(m in str(error) for m in PLACEHOLDER_MISMATCH)


# -- the guard --------------------------------------------------------------------------------------
def check(text_model: nn.Module, layers: Iterable[nn.Module]) -> None:
    """Raise ``UnsupportedTransformersError`` unless every internal vtc uses is where vtc expects it.

    Runs at ``vtc.wrap`` for the model's text backbone and its decoder layers, before any hook is
    installed; it inspects signatures and runs a one-token cache probe (microseconds).
    """
    _check_library()
    _check_classes(type(text_model), tuple(dict.fromkeys(type(layer) for layer in layers)))
    if not hasattr(text_model, "rotary_emb"):
        raise unsupported(f"{type(text_model).__name__} has no rotary_emb")
    _warn_if_untested()


def _check_library() -> None:
    try:
        from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache, masking_utils  # noqa: F401
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: F401
    except ImportError as e:
        raise unsupported(f"an import vtc needs failed ({e})") from None
    for fn in ("create_causal_mask", "create_sliding_window_causal_mask"):
        make = getattr(masking_utils, fn, None)
        if make is None:
            raise unsupported(f"transformers.masking_utils.{fn} is gone")
        missing = {"config", "inputs_embeds", "attention_mask", "position_ids", "layer_idx"} - _parameters(make)
        if missing:
            raise unsupported(f"masking_utils.{fn} takes no {', '.join(sorted(missing))}")
        cache_arg(make, f"masking_utils.{fn}")
    mapping = getattr(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", None)
    if not isinstance(mapping, dict) or "sdpa" not in mapping:
        raise unsupported("AttentionMaskInterface keeps its mask functions elsewhere")
    # A one-token probe of the cache layout vtc reads and rewrites: cache.layers[i].keys / .values.
    probe = DynamicCache()
    x = torch.zeros(1, 1, 1, 1)
    probe.update(x, x, 0)
    layer = probe.layers[0] if getattr(probe, "layers", None) else None
    if layer is None or not isinstance(getattr(layer, "keys", None), torch.Tensor) or not hasattr(layer, "values"):
        raise unsupported("DynamicCache no longer keeps per-layer .keys / .values tensors in .layers")
    if not callable(getattr(probe, "crop", None)) or layer.get_seq_length() != 1:
        raise unsupported("DynamicCache layers changed how they count or crop tokens")


def _check_classes(text_cls: type, layer_classes: tuple[type, ...]) -> None:
    cache_arg(text_cls.forward, f"{text_cls.__name__}.forward")
    for cls in layer_classes:
        names = _parameters(cls.forward)
        missing = [name for name in LAYER_ARGUMENTS if name not in names]
        if missing:
            raise unsupported(f"{cls.__name__}.forward takes no {', '.join(missing)}")
        cache_arg(cls.forward, f"{cls.__name__}.forward")


@functools.cache
def _warn_if_untested() -> None:
    from packaging.version import Version

    installed = Version(version()).release
    if not Version(TESTED_FLOOR).release <= installed <= Version(TESTED_NEWEST).release:
        logger.warning(
            "transformers %s is outside the range vtc is tested with (%s); its internals look as vtc expects, "
            "so vtc runs, but check results against an unwrapped model.",
            version(),
            tested_range(),
        )
