"""VisualLayout: where each visual token sits, the tower tokens it stands for, and placeholders that do
not fit their features refused before any forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch_for, tiny

import vtc
from vtc.adapters import adapter_for
from vtc.adapters.llava import LlavaAdapter
from vtc.adapters.qwen2_vl import Qwen2VLAdapter
from vtc.config import MethodConfig
from vtc.method import METHODS, LayerContext, Method, register_method
from vtc.state import TokenKind


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LayoutSpyConfig(MethodConfig):
    pass


class _LayoutSpy(Method):
    """Records the state a stage at the embeddings sees; keeps everything."""

    name = "layout_spy_test"
    config_cls = _LayoutSpyConfig
    seen: list = []  # noqa: RUF012  (a test probe)

    def prune_layers(self, num_layers):
        return (0,)

    def select(self, ctx: LayerContext):
        _LayoutSpy.seen.append(ctx.state)
        return None


@pytest.fixture(autouse=True)
def _spy():
    register_method(_LayoutSpy)
    _LayoutSpy.seen.clear()
    yield
    METHODS.unregister(_LayoutSpy.name)


def seen_layout(model, inputs, generate: bool = False):
    with vtc.apply(model, "layout_spy_test"), torch.no_grad():
        if generate:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        else:
            model(**inputs)
    return _LayoutSpy.seen[0]


def test_llava_items_count_across_rows_and_each_token_maps_to_its_patch():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava", images=[2, 1])
    state = seen_layout(model, inputs)
    layout, visual = state.layout, state.visual
    per = (LlavaAdapter.IMAGE_SIZE // LlavaAdapter.PATCH) ** 2
    assert layout.field("item")[0][visual[0]].unique().tolist() == [0, 1]
    assert layout.field("item")[1][visual[1]].unique().tolist() == [2]  # images of earlier rows come first
    assert layout.field("media")[1][visual[1]].unique().tolist() == [0]
    # The tower puts CLS first, so patch p of an image is tower position p + 1.
    tower = layout.tower[0, visual[0], 0]
    assert torch.equal(tower, torch.arange(per).repeat(2) + 1)
    assert bool((layout.field("kind")[visual] == TokenKind.PATCH).all())
    assert bool((layout.table[~visual] == -1).all()) and bool((layout.tower[~visual] == -1).all())


def test_qwen_tokens_map_to_their_merge_window_and_generate_agrees_with_forward():
    model = tiny("qwen2_vl")
    inputs, _ = batch_for(model, "qwen2_vl", images=[1, 1])
    forward = seen_layout(model, inputs)
    _LayoutSpy.seen.clear()
    generated = seen_layout(model, inputs, generate=True)  # features may arrive encoded, without grids
    assert torch.equal(forward.layout.table, generated.layout.table)
    assert torch.equal(forward.layout.tower, generated.layout.tower)
    visual = forward.visual[0]
    tower = forward.layout.tower[0][visual]  # [n, 4]
    n = int(visual.sum())
    assert torch.equal(tower, torch.arange(4 * n).view(n, 4))
    side = Qwen2VLAdapter.GRID // 2
    assert forward.layout.field("col")[0][visual].max() == side - 1


def test_a_placeholder_count_that_is_no_whole_image_is_refused():
    model = tiny("llava")
    _, samples = batch_for(model, "llava", batch=1)
    sample = dict(samples[0])
    ids = sample["input_ids"]
    first = int((ids[0] == LlavaAdapter.IMAGE_TOKEN).nonzero()[0])
    sample["input_ids"] = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)  # one placeholder fewer
    sample["attention_mask"] = sample["attention_mask"][:, 1:]
    with vtc.apply(model, "layout_spy_test"), pytest.raises(ValueError, match="no whole number of images"):
        model(**sample)


def test_placeholders_split_by_text_are_refused():
    model = tiny("llava")
    _, samples = batch_for(model, "llava", batch=1)
    sample = dict(samples[0])
    ids = sample["input_ids"].clone()
    first = int((ids[0] == LlavaAdapter.IMAGE_TOKEN).nonzero()[0])
    ids = torch.cat([ids[:, : first + 10], torch.tensor([[5]]), ids[:, first + 10 :]], dim=1)
    sample["input_ids"], sample["attention_mask"] = ids, torch.ones_like(ids)
    with vtc.apply(model, "layout_spy_test"), pytest.raises(ValueError, match="not contiguous"):
        model(**sample)


def test_qwen_grids_that_describe_other_counts_are_refused():
    model = tiny("qwen2_vl")
    _, samples = batch_for(model, "qwen2_vl", batch=1)
    sample = dict(samples[0])
    sample["image_grid_thw"] = torch.tensor([[1, Qwen2VLAdapter.GRID, Qwen2VLAdapter.GRID // 2]])
    with vtc.apply(model, "layout_spy_test"), pytest.raises(ValueError, match="image_grid_thw describes"):
        model(**sample)
    assert adapter_for(model).layout(torch.zeros(1, 3, dtype=torch.bool), {}) is None
