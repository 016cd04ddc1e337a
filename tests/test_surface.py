"""The transformers surface: both spellings of the cache, the guard at wrap, and one owner of internals."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from pathlib import Path

import pytest
import torch

import vtc
from vtc import surface
from vtc.adapters import ADAPTERS, adapter_for

# Internal transformers names that only vtc/surface.py may spell.
INTERNAL_NAMES = (
    "past_key_values",
    "_attn_implementation",
    "masking_utils",
    "AttentionInterface",
    "AttentionMaskInterface",
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "rotary_emb",
    "eager_attention_forward",
    "image_hidden_states",
    "get_seq_length",
    "cache_utils",
    "modeling_utils",
    "modeling_outputs",
    "check_argument_for_proper_class",
    "cached_file",
    "image_processing_pil_qwen2_vl",
    "video_utils",
    "features and image tokens",
    "features and video tokens",
)


def hook_ids(model) -> set[int]:
    return {id(h) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values()}


def test_no_module_but_the_surface_names_a_transformers_internal():
    root = Path(vtc.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "surface.py" and path.parent == root:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for name in INTERNAL_NAMES:
                if re.search(rf"\b{name}\b", code):
                    offenders.append(f"{path.relative_to(root)}:{n}: {name}")
    assert not offenders, "transformers internals outside vtc/surface.py:\n" + "\n".join(offenders)


# -- both spellings -----------------------------------------------------------------------------------
def forward_old(self, inputs_embeds=None, past_key_values=None, use_cache=None): ...


def forward_new(self, inputs_embeds=None, cache=None, use_cache=None): ...


def shimmed(fn):
    """A decorator that keeps __wrapped__, as transformers' deprecate_kwarg does."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("fn", "name"), [(forward_old, "past_key_values"), (forward_new, "cache"), (shimmed(forward_new), "cache")]
)
def test_the_cache_goes_under_the_name_the_forward_takes(fn, name):
    cache = object()
    kwargs = {"inputs_embeds": 1, "past_key_values": "stale", "cache": "stale"}
    assert surface.cache_arg(fn) == name
    assert surface.with_cache(kwargs, fn, cache) == {"inputs_embeds": 1, name: cache}
    assert kwargs == {"inputs_embeds": 1, "past_key_values": "stale", "cache": "stale"}  # the caller's dict is kept
    assert surface.cache_kwargs(fn, cache) == {name: cache}


def test_the_cache_is_read_under_either_name_the_new_one_first():
    old, new = object(), object()
    assert surface.get_cache({"past_key_values": old}) is old
    assert surface.get_cache({"cache": new}) is new
    assert surface.get_cache({"cache": new, "past_key_values": old}) is new
    assert surface.get_cache({"cache": None, "past_key_values": old}) is old
    assert surface.get_cache({}) is None


@dataclasses.dataclass
class OldOutput:
    logits: object = None
    past_key_values: object = None


@dataclasses.dataclass
class NewOutput:
    logits: object = None
    cache: object = None


@pytest.mark.parametrize("cls", [OldOutput, NewOutput])
def test_an_output_gives_its_cache_under_either_field(cls):
    cache = object()
    field = "cache" if cls is NewOutput else "past_key_values"
    assert surface.output_cache(cls(**{field: cache})) is cache
    assert surface.output_cache(cls()) is None


def test_a_real_forward_returns_a_cache_the_surface_finds_and_reuses():
    model = ADAPTERS.get("llava").tiny_model(num_layers=4)
    sample = ADAPTERS.get("llava").make_samples(model, batch=1)[0]
    with torch.no_grad():
        out = model(**sample, use_cache=True)
        cache = surface.output_cache(out)
        assert surface.is_dynamic_cache(cache)
        assert surface.layer_lengths(cache) == [sample["input_ids"].shape[1]] * 4
        step = model(input_ids=sample["input_ids"][:, -1:], **surface.cache_kwargs(model, cache), use_cache=True)
    assert surface.cached_length(surface.output_cache(step)) == sample["input_ids"].shape[1] + 1


# -- the guard ----------------------------------------------------------------------------------------
def assert_names_versions_and_way_out(error: Exception) -> None:
    text = str(error)
    assert surface.version() in text
    assert surface.TESTED_FLOOR in text and surface.TESTED_NEWEST in text
    assert "pip install" in text


def renamed_class(cls: type, forward) -> type:
    return type(f"Renamed{cls.__name__}", (cls,), {"forward": forward})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_wrap_refuses_a_text_model_whose_cache_argument_was_renamed(family):
    model = ADAPTERS.get(family).tiny_model(num_layers=4)
    text = adapter_for(model).text_model

    def forward(self, input_ids=None, kv_store=None, inputs_embeds=None, **kwargs): ...

    text.__class__ = renamed_class(type(text), forward)
    before = hook_ids(model)
    with pytest.raises(vtc.UnsupportedTransformersError, match="KV-cache argument") as caught:
        vtc.wrap(model, "dart.r64")
    assert_names_versions_and_way_out(caught.value)
    assert "Renamed" in str(caught.value)
    assert hook_ids(model) == before  # nothing was installed


def test_wrap_refuses_decoder_layers_that_lost_an_argument_vtc_replaces():
    model = ADAPTERS.get("llava").tiny_model(num_layers=4)
    layer = adapter_for(model).layers[1]

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, rope=None, **kwargs): ...

    layer.__class__ = renamed_class(type(layer), forward)
    with pytest.raises(vtc.UnsupportedTransformersError, match="position_embeddings") as caught:
        vtc.wrap(model, "dart.r64")
    assert_names_versions_and_way_out(caught.value)


def test_wrap_refuses_mask_functions_without_a_known_cache_argument(monkeypatch):
    from transformers import masking_utils

    def create_causal_mask(config, inputs_embeds, attention_mask, kv_store, position_ids=None, layer_idx=None): ...

    monkeypatch.setattr(masking_utils, "create_causal_mask", create_causal_mask)
    model = ADAPTERS.get("llava").tiny_model(num_layers=4)
    with pytest.raises(vtc.UnsupportedTransformersError, match="create_causal_mask") as caught:
        vtc.wrap(model, "dart.r64")
    assert_names_versions_and_way_out(caught.value)


def test_wrap_refuses_a_cache_that_no_longer_keeps_keys_per_layer(monkeypatch):
    import transformers

    class PagedOnly:
        def __init__(self, *args, **kwargs):
            self.pages = []

        def update(self, keys, values, layer_idx, *args, **kwargs):
            self.pages.append((keys, values))

    monkeypatch.setattr(transformers, "DynamicCache", PagedOnly)
    model = ADAPTERS.get("llava").tiny_model(num_layers=4)
    with pytest.raises(vtc.UnsupportedTransformersError, match="DynamicCache") as caught:
        vtc.wrap(model, "dart.r64")
    assert_names_versions_and_way_out(caught.value)


def test_the_installed_transformers_passes_the_guard_for_every_family():
    for family in ADAPTERS.names():
        adapter = adapter_for(ADAPTERS.get(family).tiny_model(num_layers=4))
        surface.check(adapter.text_model, adapter.layers)


def test_a_release_outside_the_tested_range_with_a_known_surface_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(surface, "version", lambda: "9.1.0")
    surface._warn_if_untested.cache_clear()
    model = ADAPTERS.get("llava").tiny_model(num_layers=4)
    try:
        with caplog.at_level(logging.WARNING, logger="vtc.surface"):
            vtc.wrap(model, "dart.r64").remove()
    finally:
        surface._warn_if_untested.cache_clear()
    assert "9.1.0" in caplog.text and surface.tested_range() in caplog.text
