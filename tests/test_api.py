"""The public API: wrap / apply / Handle, configs and presets, registries, and the errors users see."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import batch_for, tiny

import vtc
from vtc.config import MethodConfig
from vtc.method import METHODS, HookPoint, Method, register_method
from vtc.methods.dart import DARTConfig
from vtc.registry import Registry


def test_wrap_returns_a_handle_with_config_and_stats(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    handle = vtc.wrap(model, "dart", keep=64)
    try:
        assert isinstance(handle.config, DARTConfig) and handle.config.keep == 64 and handle.config.budget is None
        assert "active" in repr(handle)
        with pytest.raises(ValueError, match="no forward"):
            _ = handle.stats.flops
        with torch.no_grad():
            model(**inputs)
        assert handle.stats.backends == {"topk_gather": "torch", "dup_select": "torch"}
        assert "dart@2" in str(handle.stats)
    finally:
        handle.remove()
    assert not handle.active and "removed" in repr(handle)


def test_apply_restores_the_model_when_the_block_raises():
    model = tiny("llava")
    with pytest.raises(RuntimeError, match="boom"), vtc.apply(model, "dart.r64"):
        raise RuntimeError("boom")
    handle = vtc.wrap(model, "dart.r64")  # wrapping again works: nothing was left behind
    handle.remove()


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(vtc.UnknownMethodError, match=r"Did you mean 'dart'\?"):
        vtc.wrap(tiny("llava"), "drat")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(vtc.UnknownMethodError, match=r"dart\.r128.*dart\.r192"):
        vtc.wrap(tiny("llava"), "dart.r100")


def test_unknown_setting_suggests_the_closest_setting():
    with pytest.raises(ValueError, match=r"no setting 'kep'.*Did you mean 'keep'"):
        vtc.wrap(tiny("llava"), "dart", kep=64)


def test_unsupported_model_names_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2))  # fmt: skip
    families = "llava, llava_next, llava_next_video, llava_onevision, qwen2_5_vl, qwen2_vl"
    with pytest.raises(vtc.UnsupportedModelError, match=families):
        vtc.wrap(text_only, "dart")


def test_inner_model_without_lm_head_is_refused_with_the_fix():
    with pytest.raises(vtc.UnsupportedModelError, match="LM head"):
        vtc.wrap(tiny("llava").model, "dart")


def test_keyword_settings_with_several_methods_are_refused():
    with pytest.raises(ValueError, match="single method"):
        vtc.wrap(tiny("llava"), ["dart.r64", "dart.r128"], keep=8)


def test_listing():
    assert "dart" in vtc.list_methods()
    assert {"dart.r64", "dart.r128", "dart.r192", "dart.noop"} <= set(vtc.list_methods(presets=True))
    assert vtc.list_adapters() == [
        "llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_5_vl", "qwen2_vl"
    ]  # fmt: skip


@pytest.mark.parametrize("spec", vtc.list_methods(presets=True))
def test_configs_round_trip_through_json(spec, tmp_path):
    config = vtc.resolve(spec)
    assert MethodConfig.from_dict(json.loads(config.to_json())) == config
    path = tmp_path / "config.json"
    config.save(path)
    assert MethodConfig.load(path) == config
    assert vtc.resolve(config.to_dict()) == config


def test_replace_clears_the_other_members_of_an_exclusive_group():
    base = vtc.resolve("dart.r64")
    assert base.budget == 64
    changed = base.replace(keep=10)
    assert (changed.budget, changed.keep) == (None, 10)
    assert base.budget == 64  # configs are immutable
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.budget = 1


def test_config_from_dict_needs_the_method_key():
    with pytest.raises(ValueError, match="'method' key"):
        MethodConfig.from_dict({"budget": 64})


# -- registration, capabilities and conflicts (test-only methods, removed afterwards) -----------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _NeedsConfig(MethodConfig):
    pass


class _NeedsMissing(Method):
    name = "needs_missing_test"
    config_cls = _NeedsConfig
    requires = frozenset({"vision_cls_attn_that_no_adapter_has"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class _GenConfig(MethodConfig):
    pass


class _Generator(Method):
    name = "generator_test"
    config_cls = _GenConfig
    hooks = frozenset({HookPoint.GENERATE})


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Gen2Config(MethodConfig):
    pass


class _Generator2(_Generator):
    name = "generator2_test"
    config_cls = _Gen2Config


@pytest.fixture
def test_methods():
    for cls in (_NeedsMissing, _Generator, _Generator2):
        register_method(cls)
    yield
    for cls in (_NeedsMissing, _Generator, _Generator2):
        METHODS.unregister(cls.name)


def test_missing_capability_names_method_capability_and_family(test_methods):
    with pytest.raises(
        vtc.MissingCapabilityError, match=r"needs_missing_test.*vision_cls_attn_that_no_adapter_has.*llava"
    ):
        vtc.wrap(tiny("llava"), "needs_missing_test")


def test_conflicts_are_refused_when_wrapping(test_methods):
    model = tiny("llava")
    with pytest.raises(vtc.MethodConflictError, match="only one decoding method"):
        vtc.wrap(model, ["generator_test", "generator2_test"])
    with pytest.raises(vtc.MethodConflictError, match="listed twice"):
        vtc.wrap(model, ["dart.r64", "dart.r128"])


def test_registry_rules():
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="lower-case"):
        reg.register("B", 3)
    with pytest.raises(ValueError, match=r"no '\.'"):
        reg.register("a.b", 3)
    assert reg.unregister("a") == 1 and "a" not in reg


def test_qwen_video_tokens_are_visual_and_pruned():
    from vtc.adapters.qwen2_vl import Qwen2VLAdapter as A

    model = tiny("qwen2_vl")
    frames, grid = 2, A.GRID
    n_tokens = (frames // A.TEMPORAL) * grid * grid // 4
    ids = torch.tensor([[5, 6, A.START] + [A.VIDEO_TOKEN] * n_tokens + [A.END, 7, 8, 9, 10]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == A.VIDEO_TOKEN).long() * 2,
        "pixel_values_videos": torch.randn(frames // A.TEMPORAL * grid * grid, 3 * A.TEMPORAL * A.PATCH**2),
        "video_grid_thw": torch.tensor([[frames // A.TEMPORAL, grid, grid]]),
    }
    with vtc.apply(model, "dart.r64") as handle, torch.no_grad():
        model(**inputs)
    assert handle.stats.visual_per_layer[0] == [n_tokens]
    assert handle.stats.visual_per_layer[-1] == [68]
