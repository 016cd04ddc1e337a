"""FocusLLaVA (training-free): region merges by redundancy, text-guided top-k, and the sampler hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, instruction_attention, tiny

import vtc
from vtc.method import LayerContext
from vtc.methods.focusllava import SAMPLERS, FocusLLaVA, FocusLLaVAConfig, redundancy_sampler
from vtc.methods.windows import grid_windows, merge_windows
from vtc.state import VisualTokenState


def grid_state(images: int, side: int) -> tuple[VisualTokenState, torch.Tensor]:
    """One row: `images` side x side grids of visual tokens, coordinates set, and random features."""
    n = images * side * side
    visual = torch.ones(1, n, dtype=torch.bool)
    rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    coords = torch.cat([torch.stack([torch.full_like(rows, i), torch.zeros_like(rows), rows, cols], -1) for i in
                        range(images)])[None]  # fmt: skip
    feats = torch.randn(1, n, 6, generator=torch.Generator().manual_seed(0))
    return VisualTokenState.initial(visual, visual, coords), feats


def test_redundant_region_becomes_one_token_and_mixed_regions_try_windows():
    state, feats = grid_state(1, 8)
    index = lambda r, c: r * 8 + c  # noqa: E731
    region = [index(r, c) for r in range(4) for c in range(4)]  # top-left 4 x 4: identical
    feats[0, region] = feats[0, 0].clone()
    window = [index(r, c) for r in (4, 5) for c in (4, 5)]  # a 2 x 2 window in the bottom-right region
    feats[0, window] = feats[0, window[0]].clone() * 3
    method = FocusLLaVA(FocusLLaVAConfig())
    sel = redundancy_sampler(method, LayerContext(0, feats, state, None))
    gone = (~sel.keep[0]).nonzero().flatten().tolist()
    assert gone == sorted(region[:-1] + window[:-1])
    assert torch.allclose(sel.hidden[0, region[-1]], feats[0, 0])
    assert torch.allclose(sel.hidden[0, window[-1]], feats[0, window].mean(0))


def merge_region_by_region(feats: torch.Tensor, side: int, config: FocusLLaVAConfig) -> tuple[torch.Tensor, ...]:
    """The sampler's merges spelled out for one side x side grid: one region, then its windows, at a time."""
    hidden, keep = feats[0].clone(), torch.ones(feats.shape[1], dtype=torch.bool)
    coarse, *finer = config.regions
    for region in grid_windows(side, side, coarse):
        hidden, gone, score = merge_windows(hidden, region[None], config.redundancy)
        keep &= ~gone
        for fine in finer:
            if score[0] < config.redundancy:
                for window in region[grid_windows(coarse, coarse, fine)]:
                    hidden, gone, _ = merge_windows(hidden, window[None], config.redundancy)
                    keep &= ~gone
    return hidden, keep


@pytest.mark.parametrize("regions", [(4, 2), (8, 4, 2), (6, 3)])
def test_all_windows_of_mixed_regions_merge_as_one_region_at_a_time_would(regions):
    side = 24
    state, noise = grid_state(1, side)
    # A few features repeated over 8 x 8 areas (top half) and 2 x 2 blocks (bottom half), a little noise on
    # every token and much on a few: some regions merge whole, others only in some windows.
    blocks = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    pick = torch.randint(0, 4, (side // 2, side // 2), generator=torch.Generator().manual_seed(2))
    pick[: side // 4] = pick[: side // 4 : 4, ::4].repeat_interleave(4, 0).repeat_interleave(4, 1)[: side // 4]
    odd = torch.rand(side * side, 1, generator=torch.Generator().manual_seed(3)) < 0.05
    feats = blocks[pick.repeat_interleave(2, 0).repeat_interleave(2, 1).flatten()][None] + noise * (0.05 + odd)
    config = FocusLLaVAConfig(regions=regions, redundancy=0.95)
    sel = redundancy_sampler(FocusLLaVA(config), LayerContext(0, feats, state, None))
    hidden, keep = merge_region_by_region(feats, side, config)
    assert (~keep).any() and keep.sum() > keep.numel() // 8  # a mixed case: some windows merge, many do not
    assert torch.equal(sel.keep[0], keep)
    assert torch.allclose(sel.hidden[0], hidden)


def test_regions_never_span_two_images():
    state, _ = grid_state(2, 4)
    feats = torch.ones(1, 32, 6)  # everything identical, across both images
    sel = redundancy_sampler(FocusLLaVA(FocusLLaVAConfig()), LayerContext(0, feats, state, None))
    kept = sel.keep[0].nonzero().flatten().tolist()
    assert kept == [15, 31]  # one token per image: each 4 x 4 grid is one region


def test_text_guided_keeps_the_top_instruction_attention(family):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=2)
    config = FocusLLaVAConfig(keep=30, layer=1, vision_sampler=None)
    for sample in samples:
        attention, vis, text = instruction_attention(family, sample, 1)
        scores = attention[:, text][:, :, vis].mean(dim=(0, 1))
        expected = torch.sort(scores, descending=True, stable=True).indices[:30].sort().values
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**sample)
        assert torch.equal(handle.stats.kept_visual()[0], expected)


def test_a_registered_sampler_replaces_the_training_free_one(family):
    @SAMPLERS.decorator("leftmost_test")
    def leftmost(method, call):  # a stand-in for a trained scorer: prefer early visual tokens
        return -call.state.index.float()

    try:
        model = tiny(family)
        inputs, _ = batch_for(model, family)
        config = FocusLLaVAConfig(keep=10, vision_sampler=None, text_sampler="leftmost_test")
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**inputs)
        assert [k.tolist() for k in handle.stats.kept_visual()] == [list(range(10))] * 2
    finally:
        SAMPLERS.unregister("leftmost_test")


def test_weights_and_unknown_samplers_name_the_fix():
    with pytest.raises(ValueError, match="training-free and take no weights"):
        FocusLLaVA(FocusLLaVAConfig(sampler_weights="samplers.pt"))
    with pytest.raises(vtc.UnknownMethodError, match="Did you mean 'attention'"):
        FocusLLaVA(FocusLLaVAConfig(text_sampler="atention"))


def test_counts_are_exact_without_the_vision_stage_and_measured_with_it():
    plan = FocusLLaVA(FocusLLaVAConfig(keep=64, vision_sampler=None)).plan([576] * 32, 64)
    assert plan == [576] * 2 + [64] * 30
    with pytest.raises(ValueError, match="depend on the input"):
        vtc.flops("llava-1.5-7b", "focusllava.r64")


@pytest.mark.parametrize("regions", [(), (2, 4), (1,)])
def test_bad_regions(regions):
    with pytest.raises(ValueError, match="regions"):
        FocusLLaVAConfig(regions=regions)
