"""MustDrop: window merges, the CLS key set and the dual-attention filter against naive computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import batch_for, instruction_attention, tiny

import vtc
from vtc import surface
from vtc.methods.mustdrop import MustDropConfig
from vtc.methods.windows import grid_windows, merge_windows

ALL_WINDOWS = 25  # complete 3 x 3 windows of a 16 x 16 grid
OFF = {"merge": "off", "key_set": False, "cache_trim": False}


def test_window_score_is_the_mean_pairwise_cosine_and_merges_write_the_mean_last():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 5, generator=g)
    feats[4:] = feats[4] * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]  # window 2: one direction, four scales
    windows = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    out, gone, score = merge_windows(feats, windows, threshold=0.99)
    unit = feats[:4] / feats[:4].norm(dim=1, keepdim=True)
    pairs = [float(unit[i] @ unit[j]) for i in range(4) for j in range(4) if i != j]
    assert score[0].item() == pytest.approx(sum(pairs) / 12, abs=1e-6)
    assert score[1].item() == pytest.approx(1.0, abs=1e-6)
    assert gone.tolist() == [False] * 4 + [True, True, True, False]
    torch.testing.assert_close(out[7], feats[4:].mean(0))
    assert torch.equal(out[:7], feats[:7])


def test_only_complete_windows_in_raster_order():
    assert grid_windows(3, 4, 3).tolist() == [[0, 1, 2, 4, 5, 6, 8, 9, 10]]
    assert grid_windows(16, 16, 3).shape == (ALL_WINDOWS, 9)
    assert grid_windows(2, 5, 3).shape == (0, 9)


def test_forced_tower_merge_drops_eight_per_window_within_each_image():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava", images=[1, 2])
    config = MustDropConfig(merge_threshold=-1.0, key_set=False, filter=False)
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**inputs)
    after = 256 - 8 * ALL_WINDOWS
    assert handle.stats.visual_per_layer[0] == [after, 2 * after]
    windows = grid_windows(16, 16, 3)
    gone = windows[:, :-1].flatten()
    expected = torch.tensor([p for p in range(256) if p not in set(gone.tolist())])
    kept = handle.stats.kept_visual()[1]  # the two-image row: patch ordinals 0..511
    assert torch.equal(kept, torch.cat([expected, expected + 256]))


# LLaVA merges in the tower (above); Qwen's towers have no CLS and windowed 2-D RoPE: the embeddings path.
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_forced_merge_at_the_embeddings_on_qwen(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with vtc.apply(model, MustDropConfig(merge_threshold=-1.0, filter=False)) as handle, torch.no_grad():
        model(**inputs)
    assert handle.methods[0].merge_at == "embeddings"
    assert handle.stats.visual_per_layer[0] == [256 - 8 * ALL_WINDOWS] * 2


def tower_cls_attention(sample: dict) -> torch.Tensor:
    """Head-mean attention of CLS over the patches in the tiny LLaVA tower's last layer (eager)."""
    model = tiny("llava", attn="eager")
    with torch.no_grad():
        out = model.model.vision_tower(sample["pixel_values"], output_attentions=True)
    return out.attentions[-1][:, :, 0, 1:].mean(dim=1)  # [images, patches]


def test_key_set_is_the_cls_top_share_and_survives_every_filter():
    model = tiny("llava")
    _, samples = batch_for(model, "llava", batch=2)
    # Thresholds of 1 drop every visual token the key set does not protect.
    config = MustDropConfig(merge="off", key_set=True, global_threshold=1.0, individual_threshold=1.0)
    for sample in samples:
        cls = tower_cls_attention(sample)[0]
        k = math.ceil(0.08 * 256)
        expected = torch.sort(cls, descending=True, stable=True).indices[:k].sort().values
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**sample)
        assert torch.equal(handle.stats.kept_visual()[0], expected)
        assert handle.stats.visual_per_layer[-1] == [k]


def test_filter_drops_exactly_what_the_dual_rule_says(family):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=2)
    tau_g, tau_i = 0.004, 0.006
    config = MustDropConfig(**OFF, layers=(1,), global_threshold=tau_g, individual_threshold=tau_i)
    for sample in samples:
        attention, vis, text = instruction_attention(family, sample, 1)  # [H, L, L]
        block = attention.mean(dim=0)[text][:, vis]  # [text rows, visual columns], head mean
        g, m = block.sum(dim=0), block.amax(dim=0)
        keep = ~((g < tau_g * g.sum()) & (m < tau_i))
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**sample)
        assert torch.equal(handle.stats.kept_visual()[0], keep.nonzero().flatten())
        assert 0 < int(keep.sum()) < len(vis)  # the thresholds bite on this input


def test_raising_a_threshold_never_keeps_more(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    counts = []
    for tau in (0.001, 0.003, 0.006, 0.012):
        with vtc.apply(model, MustDropConfig(**OFF, global_threshold=tau, individual_threshold=tau)) as h:
            with torch.no_grad():
                model(**inputs)
            counts.append([v for v in h.stats.visual_per_layer[-1]])
    for a, b in itertools.pairwise(counts):
        assert all(x >= y for x, y in zip(a, b, strict=True))
    assert counts[0] != counts[-1]


def test_caches_from_the_first_filter_layer_hold_the_final_tokens(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family, batch=1)
    config = MustDropConfig(
        **{**OFF, "cache_trim": True}, layers=(1, 2), global_threshold=0.01, individual_threshold=0.01
    )
    with vtc.apply(model, config) as handle, torch.no_grad():
        cache = surface.output_cache(model(**inputs, use_cache=True))
    stats = handle.stats
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert lengths[0] == inputs["input_ids"].shape[1]  # layer 0 runs before the first filter
    assert lengths[1:] == [stats.tokens_per_layer[-1][0]] * 3  # layer 1 (filtered after) onwards: final


def test_qwen_has_no_tower_stage_or_cls_and_says_so():
    model = tiny("qwen2_vl")
    with pytest.raises(vtc.MissingCapabilityError, match="merge='embeddings'"):
        vtc.wrap(model, "mustdrop", merge="tower")
    with pytest.raises(vtc.MissingCapabilityError, match="key_set=False"):
        vtc.wrap(model, "mustdrop", key_set=True)


def test_counts_are_data_dependent_so_analytic_flops_refuse():
    with pytest.raises(ValueError, match=r"handle\.stats"):
        vtc.flops("llava-1.5-7b", "mustdrop.t64")


def test_a_budget_is_the_dual_rule_at_the_smallest_threshold_scale_that_meets_it(family):
    """keep=N keeps exactly N, and the same tokens as the paper's rule with both thresholds scaled per row."""
    model = tiny(family)
    _, samples = batch_for(model, family, batch=2)
    tau_g, tau_i, k = 0.004, 0.006, 40
    config = MustDropConfig(**OFF, layers=(1,), global_threshold=tau_g, individual_threshold=tau_i, keep=k)
    for sample in samples:
        attention, vis, text = instruction_attention(family, sample, 1)
        block = attention.mean(dim=0)[text][:, vis].double()
        g, m = block.sum(dim=0), block.amax(dim=0)

        def kept(s: float, g: torch.Tensor = g, m: torch.Tensor = m) -> torch.Tensor:
            return ~((g < s * tau_g * g.sum()) & (m < s * tau_i))

        lo, hi = 0.0, 1e6  # search the scale: the smallest that keeps at most k
        for _ in range(200):
            lo, hi = (lo, (lo + hi) / 2) if int(kept((lo + hi) / 2).sum()) <= k else ((lo + hi) / 2, hi)
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**sample)
        assert int(kept(hi).sum()) == k
        assert torch.equal(handle.stats.kept_visual()[0], kept(hi).nonzero().flatten())


def test_budget_stages_step_down_geometrically_to_the_budget_and_presets_share_it(family):
    model = tiny(family)
    inputs, samples = batch_for(model, family)
    for spec, settings in [("mustdrop", {"keep_ratio": 0.1}), ("mustdrop.r64", {})]:
        config = vtc.resolve(spec, **OFF, layers=(0, 1, 2), **settings)
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**inputs)
        for row in range(len(samples)):
            n = handle.stats.visual_per_layer[0][row]
            final = int(n * 0.1) if settings else min(64, n)
            steps = [round(n * (final / n) ** (j / 3)) for j in (1, 2, 3)]
            assert [v[row] for v in handle.stats.visual_per_layer] == [n, *steps]
    assert vtc.resolve("mustdrop.t64").global_threshold == 0.011 and vtc.resolve("mustdrop.t64").keep is None
