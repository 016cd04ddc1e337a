"""DART against a naive loop implementation of the paper's algorithm, and its invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, forward_inputs, generate, tiny

import vtc
from vtc import surface
from vtc.adapters import adapter_for
from vtc.methods.dart import DARTConfig


def naive_dart(
    model, sample: dict, layer: int, per_pivot: int | None, keep: int | None = None
) -> tuple[list[int], list[int]]:
    """The paper's DART on one unpadded row, with Python loops; returns (kept, image pivot) patch ordinals.

    Keys come from the unwrapped model's KV cache and hidden states from ``output_hidden_states``, so
    nothing of vtc's tap or kernels is involved.
    """
    adapter = adapter_for(model)
    with torch.no_grad():
        out = model(**sample, use_cache=True, output_hidden_states=True)
    keys = surface.layer_kv(surface.output_cache(out), layer - 1)[0][0]  # [Hkv, L, D], post-RoPE
    hidden = out.hidden_states[layer][0]  # input of `layer`: [L, d]
    z = adapter.final_norm(hidden).float()
    norms = keys.float().abs().sum(dim=(0, 2)).tolist()
    visual = adapter.visual_mask(sample["input_ids"], None)[0].tolist()
    vis = [i for i, v in enumerate(visual) if v]
    first = vis[0]
    text = [i for i, v in enumerate(visual) if not v and i > first]

    def top(cands: list[int], n: int) -> list[int]:
        return sorted(cands, key=lambda i: (-norms[i], i))[:n]

    image_pivots, text_pivots = top(vis, 4), top(text, 4)
    pivots = sorted(image_pivots + text_pivots)
    if keep is not None:  # vtc's exact mode: share keep - 4 picks, the first pivots take the remainder
        picks, n_p = keep - len(image_pivots), len(pivots)
        counts = [picks // n_p + (1 if j < picks % n_p else 0) for j in range(n_p)]
    else:
        counts = [per_pivot] * len(pivots)
    pool = [i for i in vis if i not in image_pivots]
    kept = list(image_pivots)
    for p, count in zip(pivots, counts, strict=True):
        cos = {j: torch.nn.functional.cosine_similarity(z[p], z[j], dim=0).item() for j in pool}
        chosen = sorted(pool, key=lambda j: (cos[j], j))[:count]
        kept += chosen
        pool = [j for j in pool if j not in chosen]
    return sorted(vis.index(i) for i in kept), sorted(vis.index(i) for i in image_pivots)


@pytest.mark.parametrize("settings", [{"budget": 64}, {"budget": 128}, {"keep": 50}, {"keep": 9, "layer": 3}], ids=str)
def test_matches_naive_loop_implementation(family, settings):
    model = tiny(family)
    inputs, samples = batch_for(model, family, batch=3)
    config = DARTConfig(**settings)
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**forward_inputs(family, inputs))
        kept = handle.stats.kept_visual()
    per_pivot = config.budget // 8 if config.budget is not None else None
    for row, sample in enumerate(samples):
        expected, image_pivots = naive_dart(model, sample, config.layer, per_pivot, config.keep)
        assert kept[row].tolist() == expected
        assert set(image_pivots) <= set(kept[row].tolist())  # every image pivot is kept


@pytest.mark.parametrize("budget,kept", [(192, 196), (128, 132), (64, 68), (8, 12)])
def test_paper_counts_four_plus_eight_t(family, budget, kept):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    n = adapter_for(model).visual_mask(inputs["input_ids"], None).sum(dim=1).tolist()  # 256 a row; anyres: more
    with vtc.apply(model, "dart", budget=budget) as handle, torch.no_grad():
        model(**inputs)
    assert [len(k) for k in handle.stats.kept_visual()] == [min(kept, v) for v in n]
    assert handle.stats.visual_per_layer[1] == n and handle.stats.visual_per_layer[2] == [min(kept, v) for v in n]


@pytest.mark.parametrize("settings", [{"keep": 64}, {"keep": 4}, {"keep_ratio": 0.25}])
def test_exact_keep_modes(family, settings):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    n = adapter_for(model).visual_mask(inputs["input_ids"], None).sum(dim=1).tolist()
    expected = [settings.get("keep") or int(v * settings["keep_ratio"]) for v in n]
    with vtc.apply(model, "dart", **settings) as handle, torch.no_grad():
        model(**inputs)
    assert [len(k) for k in handle.stats.kept_visual()] == expected


def test_layers_before_k_are_bit_identical(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states
        with vtc.apply(model, "dart.r64"):
            pruned = model(**inputs, output_hidden_states=True).hidden_states
    for i in range(3):  # embeddings, outputs of layers 0 and 1 (= inputs of layers 1 and 2)
        assert torch.equal(base[i], pruned[i])
    assert pruned[3].shape[1] < base[3].shape[1]


def test_budget_above_visual_count_is_exactly_the_baseline(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    n = adapter_for(model).visual_mask(inputs["input_ids"], None).sum(dim=1).tolist()
    with torch.no_grad():
        base = model(**inputs).logits
        with vtc.apply(model, "dart", keep=max(n) + 1) as handle:
            assert torch.equal(model(**inputs).logits, base)
            assert [len(k) for k in handle.stats.kept_visual()] == n


def test_rows_without_images_are_untouched(family):
    model = tiny(family)
    inputs, samples = batch_for(model, family, images=[1, 0])
    with vtc.apply(model, "dart.r64") as handle, torch.no_grad():
        tokens = generate(model, inputs)
        assert [len(k) for k in handle.stats.kept_visual()] == [68, 0]
        assert torch.equal(generate(model, samples[1])[0], tokens[1])
    with torch.no_grad():  # the text-only row decodes as the unwrapped model does
        assert torch.equal(generate(model, samples[1])[0], tokens[1])


def test_selection_does_not_depend_on_attention_backend(family):
    kept = []
    for attn in ("sdpa", "eager"):
        model = tiny(family, attn=attn)
        inputs, _ = batch_for(model, family)
        with vtc.apply(model, "dart.r64") as handle, torch.no_grad():
            model(**inputs)
            kept.append(handle.stats.kept_visual())
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


def test_negative_and_out_of_range_layers():
    model = tiny("llava")
    with vtc.apply(model, "dart", layer=-1, keep=8) as handle:
        assert handle.methods[0].prune_layers(4) == (3,)
    with pytest.raises(ValueError, match=r"use 1\.\.3"):
        vtc.wrap(model, "dart", layer=4)
    with pytest.raises(ValueError, match="at least 1"):
        DARTConfig(layer=0)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"keep": 3}, "keep must be an integer of at least 4"),
        ({"keep_ratio": 0.0}, r"keep_ratio must be a number in \(0, 1\]"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"budget": -1}, "budget must be an integer of at least 0"),
        ({"budget": 64, "keep": 8}, "only one of budget, keep, keep_ratio"),
        ({"pivot_image_tokens": 0, "pivot_text_tokens": 0}, "at least one pivot"),
        ({"layer": 1.5}, "layer must be an integer"),
    ],
)
def test_bad_settings_say_the_valid_range(settings, match):
    with pytest.raises(ValueError, match=match):
        DARTConfig(**settings)
