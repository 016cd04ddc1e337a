"""SparseVLM: raters, scores and counts against naive computations; recycling and clustering by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, text_inputs, tiny

import vtc
from vtc.adapters import adapter_for
from vtc.method import get_method
from vtc.methods.attention import raters
from vtc.methods.recycling import density_peak_clusters, recycle
from vtc.methods.sparsevlm import SparseVLMConfig
from vtc.methods.sparsevlm_schedule import SCHEDULES, interpolated_schedule, rank_keep
from vtc.state import VisualTokenState


def embeddings_and_attention(family: str, sample: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unwrapped eager model's input embeddings [L, d] and layer attention [H, L, L] for one row."""
    embeds, out = text_inputs(tiny(family, attn="eager"), sample, output_attentions=True)
    return embeds[0], out.attentions[layer][0]


def naive_raters(embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Step A of the paper, one row, loops: text tokens after the image whose relevance beats the mean."""
    first = int(visual.nonzero()[0])
    vis = [i for i in range(len(visual)) if visual[i]]
    text = [i for i in range(len(visual)) if not visual[i] and i > first]
    relevance = torch.zeros(len(text))
    for v in vis:
        relevance += torch.softmax(torch.stack([embeds[v] @ embeds[t] for t in text]), dim=0)
    relevance /= len(vis)
    return torch.tensor([t for t, r in zip(text, relevance, strict=True) if r > relevance.mean()])


def naive_scores(family: str, sample: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per visual token (input order), the naive raters' mean attention at `layer`; and the visual positions."""
    embeds, attention = embeddings_and_attention(family, sample, layer)
    visual = adapter_for(tiny(family)).visual_mask(sample["input_ids"], None)[0]
    vis = visual.nonzero().flatten()
    return attention[:, naive_raters(embeds.float(), visual)][:, :, vis].mean(dim=(0, 1)), vis  # [Nv], [Nv]


def test_raters_are_the_text_tokens_whose_relevance_beats_the_mean(family):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=2)
    for sample in samples:
        embeds, _ = text_inputs(model, sample)
        visual = adapter_for(model).visual_mask(sample["input_ids"], None)
        state = VisualTokenState.initial(visual, torch.ones_like(visual))
        expected = naive_raters(embeds[0].float(), visual[0])
        after_image = int((~visual[0] & (visual[0].cumsum(0) > 0)).sum())
        assert 0 < len(expected) < after_image  # some of the text after the image rates, not all of it
        assert torch.equal(raters(embeds, state)[0].nonzero().flatten(), expected)


@pytest.mark.parametrize("budget", [64, 192])
def test_single_stage_keeps_the_naive_top_k(family, budget):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=2)
    config = SparseVLMConfig(schedule=(SCHEDULES[budget][0],), layers=(1,), recycle=False)
    for sample in samples:
        scores, vis = naive_scores(family, sample, 1)
        k = round(SCHEDULES[budget][0] * len(vis) / 576)
        expected = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**sample)
        assert torch.equal(handle.stats.kept_visual()[0], expected)


def test_recycling_adds_the_declared_clusters_from_the_best_pruned(family):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1)
    config = SparseVLMConfig(schedule=(40,), layers=(1,))
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**samples[0])
    scores, vis = naive_scores(family, samples[0], 1)
    k = round(40 * len(vis) / 576)
    kept = handle.stats.stages[-1].kept_positions[0]
    by_score = vis[torch.sort(scores, descending=True, stable=True).indices]  # input positions, best first
    top_k, rest = by_score[:k], by_score[k:]
    n_candidates = int(0.3 * (len(vis) - k)) + 1
    clusters = int(n_candidates * 0.1) + 1
    assert len(kept) == k + clusters
    assert torch.isin(top_k, kept).all()
    assert torch.isin(kept[~torch.isin(kept, top_k)], rest[:n_candidates]).all()  # centres are candidates


def two_blobs() -> torch.Tensor:
    hidden = torch.zeros(1, 6, 2)
    hidden[0, :3] = torch.tensor([[0.0, 10.0], [0.2, 10.0], [0.1, 10.2]])
    hidden[0, 3:] = torch.tensor([[10.0, 0.0], [10.2, 0.0], [10.0, 0.1]])
    return hidden


def test_recycled_tokens_are_the_means_of_their_clusters():
    # 6 pruned tokens, all candidates (ratio 1.0): int(7 * 0.2) + 1 = 2 clusters, one per blob.
    hidden = two_blobs()
    pruned = torch.ones(1, 6, dtype=torch.bool)
    new, centres = recycle(hidden, torch.arange(6.0)[None], pruned, recycle_ratio=1.0, cluster_ratio=0.2)
    slots = centres[0].nonzero().flatten().tolist()
    assert len(slots) == 2 and slots[0] < 3 <= slots[1]
    torch.testing.assert_close(new[0, slots[0]], hidden[0, :3].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(new[0, slots[1]], hidden[0, 3:].mean(0), atol=1e-6, rtol=0)
    others = [i for i in range(6) if i not in slots]
    assert torch.equal(new[0, others], hidden[0, others])  # only the centres' slots change


def test_density_peaks_find_two_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 4, generator=g) * 0.01
    b = torch.randn(10, 4, generator=g) * 0.01 + 5
    centres, assign = density_peak_clusters(torch.cat([a, b]), 2)
    assert {int(c) // 10 for c in centres} == {0, 1}  # one centre per blob
    assert (assign[:10] == assign[0]).all() and (assign[10:] == assign[10]).all() and assign[0] != assign[10]


def test_identical_features_merge_to_that_feature():
    hidden = torch.full((1, 6, 3), 0.5)
    pruned = torch.ones(1, 6, dtype=torch.bool)
    new, centres = recycle(hidden, torch.zeros(1, 6), pruned, recycle_ratio=1.0, cluster_ratio=0.5)
    assert centres.sum() == int(7 * 0.5) + 1
    assert torch.equal(new, hidden)


def test_equal_relevance_makes_every_text_token_a_rater():
    visual = torch.tensor([[False, True, True, False, False, False]])
    state = VisualTokenState.initial(visual, torch.ones_like(visual))
    hidden = torch.ones(1, 6, 4)  # every dot product equal: relevance is flat
    assert raters(hidden, state).tolist() == [[False, False, False, True, True, True]]


def test_layers_before_the_first_stage_are_bit_identical(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states
        with vtc.apply(model, "sparsevlm", schedule=(20,), layers=(1,)):
            pruned = model(**inputs, output_hidden_states=True).hidden_states
    for i in range(3):  # embeddings, outputs of layers 0 and 1: the stage prunes layer 1's output
        assert torch.equal(base[i], pruned[i])
    assert pruned[3].shape[1] < base[3].shape[1]


def test_rank_adaptive_keeps_rank_times_scale_plus_bias(family):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1)
    sample = samples[0]
    embeds, attention = embeddings_and_attention(family, sample, 1)
    visual = adapter_for(model).visual_mask(sample["input_ids"], None)[0]
    rating = naive_raters(embeds.float(), visual)
    matrix = attention[:, rating][:, :, visual.nonzero().flatten()].mean(dim=0)  # [R, Nv]
    rank = int(torch.linalg.matrix_rank(matrix.float()))
    config = SparseVLMConfig(budget=128, layers=(1,), rank_adaptive=True, recycle=False, rank_scale=2.0, rank_bias=3)
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**sample)
    assert len(handle.stats.kept_visual()[0]) == min(int(rank * 2.0 + 3), int(visual.sum()))


def test_schedules_interpolate_through_the_papers_points_to_keep_all():
    for budget, schedule in SCHEDULES.items():
        assert interpolated_schedule(budget / 576) == pytest.approx(schedule)
    assert interpolated_schedule(1.0) == (576.0, 576.0, 576.0)
    # 0.5 lies a quarter of the way from the r192 schedule (1/3) to keep-all (1.0)
    assert interpolated_schedule(0.5) == pytest.approx((369.0, 294.0, 226.5))


def test_planned_counts_reproduce_the_official_schedule_for_llava_7b():
    """Counts entering layers 0-2 / 3-6 / 7-15 / 16-31 and the layer-averaged budgets (research notes)."""
    for budget, segments, averaged in [(192, [576, 309, 204, 113], 192.0), (64, [576, 82, 32, 18], 64.8)]:
        plan = get_method("sparsevlm")(vtc.resolve(f"sparsevlm.r{budget}")).plan([576] * 32, 64)
        assert plan == [segments[0]] * 3 + [segments[1]] * 4 + [segments[2]] * 9 + [segments[3]] * 16
        after = [*plan[1:], plan[-1]]
        assert sum(after) / 32 == pytest.approx(averaged, abs=0.05)


def test_stats_report_the_layer_averaged_budget(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with vtc.apply(model, "sparsevlm.r64") as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    after = [*stats.visual_per_layer[1:], stats.visual_per_layer[-1]]
    assert stats.layer_averaged_visual() == [sum(r[b] for r in after) / 4 for b in range(2)]
    assert "layer-averaged" in str(stats)


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"budget": 100}, r"one of the paper's \[64, 96, 128, 192\]"),
        ({"budget": 64, "keep_ratio": 0.2}, "only one of"),
        ({"schedule": (10, 5), "layers": (1,)}, "one count per pruning layer"),
        ({"keep": -1}, "keep must be an integer"),
        ({"recycle_ratio": 1.5}, "recycle_ratio"),
        ({"rank_adaptive": True, "keep_ratio": 0.3}, "rank_scale and rank_bias"),
    ],
)
def test_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        SparseVLMConfig(**settings)


def test_layers_out_of_range_name_the_fix():
    with pytest.raises(ValueError, match="no output left"):
        vtc.wrap(tiny("llava"), "sparsevlm", layers=(3,))
    with pytest.raises(ValueError, match=r"use 0\.\.3"):
        vtc.wrap(tiny("llava"), "sparsevlm", layers=(9,))


def test_v1_rank_mode_prunes_after_layers_2_6_15_19_as_its_official_code():
    v1 = get_method("sparsevlm")(SparseVLMConfig(budget=128, rank_adaptive=True))
    v15 = get_method("sparsevlm")(SparseVLMConfig(budget=128))
    assert v1.scored_layers(32) == (2, 6, 15, 19) and v15.scored_layers(32) == (2, 6, 15)


def test_an_explicit_rank_bias_of_zero_is_used():
    ranks = torch.tensor([3, 10])
    config = SparseVLMConfig(budget=128, rank_adaptive=True, rank_bias=0.0)  # the script's bias for 128 is 6
    assert rank_keep(ranks, config).tolist() == [27, 90]
    assert rank_keep(ranks, SparseVLMConfig(budget=128, rank_adaptive=True)).tolist() == [33, 96]


@pytest.mark.parametrize("rank_adaptive", [False, True])
def test_stages_landing_on_one_layer_merge_on_a_shallow_model(rank_adaptive):
    """On 3 layers 6 and 15 (of 32) both land on layer 1: one stage with the later count, no error."""
    model = tiny("llava", num_layers=3)
    inputs, _ = batch_for(model, "llava", batch=1)
    settings = {"budget": 128, "rank_adaptive": rank_adaptive, "recycle": False}
    with vtc.apply(model, "sparsevlm", **settings) as handle, torch.no_grad():
        model(**inputs)
    assert [s.layer for s in handle.stats.stages] == [1, 2]
    if not rank_adaptive:
        n = handle.stats.visual_per_layer[0][0]
        assert handle.stats.visual_per_layer[2][0] == round(SCHEDULES[128][2] * n / 576)  # 36 of 576, not 110


def test_layers_that_do_not_match_the_schedule_say_what_to_pass():
    with pytest.raises(ValueError, match=r"layers=\(1, 2\) gives 2 pruning layers .* pass schedule= with 2 counts"):
        vtc.wrap(tiny("llava"), "sparsevlm", layers=(1, 2))


def test_keep_reads_as_the_papers_schedule_for_that_budget(family):
    """keep=N is the schedule of keep_ratio N / (the row's visual tokens): keep=192 of 576 is budget 192."""
    method = get_method("sparsevlm")
    assert method(vtc.resolve("sparsevlm", keep=192)).plan([576] * 32, 64) == method(
        vtc.resolve("sparsevlm.r192")
    ).plan([576] * 32, 64)
    model = tiny(family)
    inputs, samples = batch_for(model, family)
    with vtc.apply(model, "sparsevlm", keep=40) as handle, torch.no_grad():
        model(**inputs)
    for row, sample in enumerate(samples):
        n = int(adapter_for(model).visual_mask(sample["input_ids"], None).sum())
        planned = method(vtc.resolve("sparsevlm", keep_ratio=40 / n)).plan([n] * 4, 0)
        assert [v[row] for v in handle.stats.visual_per_layer] == planned
