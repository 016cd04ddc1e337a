"""CacheView: evictions that later decode steps honour, quantization within its bound, and a crop that
undoes a rejected speculative step bit for bit."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import batch_for, tiny
from engine_fixtures import ColumnOracle, SeededKeep, SeededKeepConfig, decode_steps, greedy, prefill_positions

import vtc
from vtc import surface
from vtc.adapters import adapter_for
from vtc.config import MethodConfig
from vtc.engine import CacheView, ForwardKind, dequantize, quantize
from vtc.method import METHODS, HookPoint, Method, register_method

FAMILIES = ["llava", "qwen2_vl"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvictConfig(MethodConfig):
    from_layer: int = 2
    every: int = 3  # evict every third visual column


class EvictAfterPrefill(Method):
    """Test cache hook: after the prefill, evicts every `every`-th visual token from layers `from_layer`.."""

    name = "evict_after_prefill_test"
    config_cls = EvictConfig
    hooks = frozenset({HookPoint.CACHE})

    def __init__(self, config: EvictConfig) -> None:
        super().__init__(config)
        self.dropped: torch.Tensor | None = None  # [B, columns] what the last prefill evicted

    def on_cache(self, view: CacheView, kind: ForwardKind) -> None:
        if kind is not ForwardKind.PREFILL:
            return
        visual = view.visual_columns()
        drop = visual & (visual.long().cumsum(1) % self.config.every == 0)
        self.dropped = drop
        view.evict(drop, from_layer=self.config.from_layer)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    for cls in (SeededKeep, EvictAfterPrefill):
        register_method(cls)
    yield
    for cls in (SeededKeep, EvictAfterPrefill):
        METHODS.unregister(cls.name)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_eviction_then_decode_steps_equal_the_masked_oracle(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family, images=[1, 1], batch=2)
    with vtc.apply(model, EvictConfig(from_layer=2)) as handle, torch.no_grad():
        tokens, out = greedy(model, family, inputs, 5)
        logits = decode_steps.last.logits[:, -1]
        dropped = handle.methods[0].dropped
    visual = adapter_for(model).visual_mask(inputs["input_ids"], None)
    assert torch.equal(dropped & ~visual, torch.zeros_like(dropped)), "only visual columns are evicted"
    assert dropped is not None and int(dropped.sum()) > 0
    lengths = surface.layer_lengths(surface.output_cache(out))
    assert lengths[2] < lengths[1], "the evicted layers hold fewer tokens"
    oracle = ColumnOracle()
    for row in range(2):
        oracle.hide(2, row, dropped[row].nonzero().flatten(), decode_only=True)
    oracle.install(model)
    try:
        with torch.no_grad():
            expected, _ = greedy(model, family, inputs, 5)
            expected_logits = decode_steps.last.logits[:, -1]
    finally:
        oracle.uninstall(model)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=2e-5)
    with torch.no_grad():  # the eviction matters: the unwrapped model decodes differently
        greedy(model, family, inputs, 5)
    assert not torch.allclose(decode_steps.last.logits[:, -1], expected_logits, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_then_dequantize_is_within_half_a_step(bits):
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava", batch=2)
    with torch.no_grad():
        cache = surface.output_cache(model(**inputs, use_cache=True))
    view = CacheView(cache, adapter_for(model).num_layers)
    before = [tuple(t.clone() for t in surface.layer_kv(cache, j)) for j in range(view.num_layers)]
    quantized = view.quantize(range(view.num_layers), bits=bits, group=8)
    view.dequantize(quantized)
    for j, originals in enumerate(before):
        for x, q, restored in zip(originals, quantized[j], surface.layer_kv(cache, j), strict=True):
            error = (restored - x).abs().unflatten(-1, (-1, 8))  # [..., groups, 8]
            assert bool((error <= q.scale / 2 + 1e-6).all())
            assert int(q.codes.max()) <= 2**bits - 1
            assert float(error.max()) > 0  # it did quantize
    with pytest.raises(ValueError, match="group"):
        quantize(before[0][0], 4, group=7)
    with pytest.raises(ValueError, match="bits"):
        quantize(before[0][0], 9, group=8)


def test_dequantize_restores_a_constant_group_exactly():
    x = torch.full((1, 2, 3, 8), 0.25)
    assert torch.equal(dequantize(quantize(x, 4, 8)), x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pruned_extend", [False, True])
def test_crop_after_a_rejected_speculative_step_restores_the_cache_bit_for_bit(family, pruned_extend):
    from test_extend import chunk_of, extend_inputs

    model = tiny(family)
    inputs, _ = batch_for(model, family, images=[1, 1], batch=2)
    with vtc.apply(model, SeededKeepConfig(layers=(2,))) as handle, torch.no_grad():
        positions = prefill_positions(model, family, inputs)
        out = model(**inputs, position_ids=positions, use_cache=True)
        cache = surface.output_cache(out)
        view = CacheView(cache, handle.adapter.num_layers)
        columns = view.columns
        snapshot = copy.deepcopy(cache)
        chunk = chunk_of(model, family, 2, 5, image=pruned_extend, seed=3)
        verify = model(**extend_inputs(model, family, inputs, chunk, cache), use_cache=True)
        assert view.columns == columns + chunk["input_ids"].shape[1]
        assert (len(view.record.chunks) == 2) == pruned_extend  # a pruned extend is recorded
        view.crop(columns)  # every drafted token rejected
        for j in range(view.num_layers):
            for now, then in zip(surface.layer_kv(cache, j), surface.layer_kv(snapshot, j), strict=True):
                assert torch.equal(now, then)
        assert len(view.record.chunks) == 1 and view.columns == columns
        mask = inputs["attention_mask"]
        after_crop = decode_steps(model, family, out, mask, positions[..., -1:], 3)
        from_snapshot = decode_steps(model, family, _with_cache(out, snapshot), mask, positions[..., -1:], 3)
    assert verify.logits.shape[0] == 2
    assert torch.equal(after_crop, from_snapshot)


def _with_cache(out, cache):
    """`out` carrying another cache object (its logits unchanged)."""
    out = copy.copy(out)
    field = "cache" if "cache" in {f.name for f in dataclasses.fields(out)} else "past_key_values"
    setattr(out, field, cache)
    return out


def test_crop_refuses_to_cut_inside_a_pruned_forward():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava", batch=2)
    with vtc.apply(model, SeededKeepConfig(layers=(2,))), torch.no_grad():
        cache = surface.output_cache(model(**inputs, use_cache=True))
        view = CacheView(cache, adapter_for(model).num_layers)
        with pytest.raises(ValueError, match="boundary"):
            view.crop(view.columns - 3)
