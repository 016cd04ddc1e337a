"""One Budget for every pruner: its counts and clamp, its units (row, image), the shared top-k, and the templates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch_for, forward_inputs, tiny

import vtc
from vtc.adapters import adapter_for
from vtc.budget import Budget, keep_top_k
from vtc.config import MethodConfig
from vtc.method import AttentionScoredPruner, LayerContext, get_method, realign
from vtc.methods.random import RandomConfig, token_hash
from vtc.state import VisualLayout, VisualTokenState

N = torch.tensor([0, 3, 10, 300])  # units holding these many visual tokens


def test_keep_is_exact_and_capped_at_what_a_unit_holds():
    assert Budget(keep=5).resolve(N).tolist() == [0, 3, 5, 5]
    assert Budget(keep=0).resolve(N).tolist() == [0, 0, 0, 0]


def test_ratio_rounds_down_and_one_keeps_everything():
    assert Budget(ratio=0.25).resolve(N).tolist() == [0, 0, 2, 75]
    assert Budget(ratio=1.0).resolve(N).tolist() == N.tolist()
    assert Budget(ratio=1.0).keeps_everything and not Budget(ratio=0.99).keeps_everything


def test_paper_budgets_and_ratios_read_by_the_method_end_in_the_same_clamp():
    double = lambda n: 2 * n + 1  # noqa: E731  a rule that asks for more than a unit holds
    assert Budget(paper=64).resolve(N, paper=double).tolist() == N.tolist()
    assert Budget(paper=64).resolve(N, paper=lambda n: n - 5).tolist() == [0, 0, 5, 295]  # never negative
    assert Budget(ratio=0.5).resolve(N, ratio=lambda n: n - 1).tolist() == [0, 2, 9, 299]
    assert Budget(keep=1).resolve(N, at_least=torch.tensor([4, 4, 4, 4])).tolist() == [0, 3, 4, 4]
    with pytest.raises(ValueError, match="needs the method's rule; use keep or keep_ratio"):
        Budget(paper=64).resolve(N)


def test_counts_keep_the_shape_of_the_units():
    per_image = torch.tensor([[3, 10], [0, 7]])
    assert Budget(keep=5).resolve(per_image).tolist() == [[3, 5], [0, 5]]


@pytest.mark.parametrize(
    "settings,match",
    [
        ({}, "exactly one of keep, ratio, paper; got none"),
        ({"keep": 3, "ratio": 0.5}, "got keep, ratio"),
        ({"keep": -1}, "keep must be an integer of at least 0"),
        ({"ratio": 0.0}, r"ratio must be a number in \(0, 1\]"),
        ({"keep": 3, "scope": "tile"}, "scope must be one of 'row', 'image', 'frame', 'crop'; got 'tile'"),
    ],
)
def test_bad_budgets_name_the_problem_and_the_fix(settings, match):
    with pytest.raises(ValueError, match=match):
        Budget(**settings)


def test_configs_hold_one_budget():
    assert Budget.of(vtc.resolve("dart.r64")) == Budget(paper=64)
    assert Budget.of(vtc.resolve("dart", keep=9)) == Budget(keep=9)
    assert Budget.of(vtc.resolve("sparsevlm", schedule=(40,), layers=(1,))) == Budget(paper=(40,))
    assert Budget.of(vtc.resolve("gemfilter.noop")) == Budget(ratio=1.0)
    assert Budget.of(vtc.resolve("random", keep=7, budget_scope="image")) == Budget(keep=7, scope="image")
    with pytest.raises(ValueError, match="no budget setting"):
        Budget.of(vtc.resolve("var"))


@pytest.mark.parametrize("method", ["random", "focusllava", "gemfilter", "dart"])
def test_every_pruner_counts_keep_and_keep_ratio_alike(method):
    """The pruners that took keep / keep_ratio each clamped in their own way; now one Budget counts for all."""
    settings = {"vision_sampler": None} if method == "focusllava" else {}
    for budget, kept in [({"keep": 40}, 40), ({"keep": 300}, 256), ({"keep_ratio": 0.3}, 76)]:
        plan = get_method(method)(vtc.resolve(method, **budget, **settings)).plan([256] * 8, 20)
        assert plan[-1] == kept, (method, budget, plan)


def test_config_budget_errors_keep_their_messages_and_json_round_trips():
    with pytest.raises(ValueError, match="random: set only one of keep, keep_ratio; got keep, keep_ratio"):
        RandomConfig(keep=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match="dart: keep must be an integer of at least 4"):
        vtc.resolve("dart", keep=3)
    with pytest.raises(ValueError, match=r"random: budget_scope must be one of 'row', .*; got 'tile'"):
        RandomConfig(budget_scope="tile")
    config = RandomConfig(keep_ratio=0.5, budget_scope="image")
    assert MethodConfig.from_dict(json.loads(config.to_json())) == config


def test_units_are_rows_or_the_images_of_a_row():
    visual = torch.tensor([[False, True, True, True, False, True]])
    coords = torch.full((1, 6, 4), -1)
    coords[0, [1, 2, 3], 0], coords[0, 5, 0] = 0, 1
    state = VisualTokenState.initial(visual, torch.ones_like(visual), coords)
    assert Budget(keep=1).units(state).tolist() == [[0] * 6]
    units = Budget(keep=1, scope="image").units(state)
    assert Budget.count(visual, units).tolist() == [[3, 1]]
    with pytest.raises(ValueError, match="does not report it; use budget_scope='row'"):
        Budget(keep=1, scope="image").units(VisualTokenState.initial(visual, torch.ones_like(visual)))
    coords[0, 3, 0] = -1  # a visual token without an image (a CLS token)
    with pytest.raises(ValueError, match="image of every visual token"):
        Budget(keep=1, scope="image").units(VisualTokenState.initial(visual, torch.ones_like(visual), coords))


def test_units_per_frame_and_per_crop_follow_the_layout():
    """Two rows: an anyres image (base view, two tiles, a newline) and a 3-frame video after an image."""
    fields = ("media", "frame", "crop", "kind")
    row0 = [(0, 0, -1, 0)] * 2 + [(0, 0, 0, 0)] * 2 + [(0, 0, 1, 0)] * 2 + [(0, 0, -1, 1)]
    row1 = [(0, 0, -1, 0)] * 2 + [(1, f, -1, 0) for f in (0, 0, 1, 1, 2)]
    layout = VisualLayout.empty(2, 8, 1, torch.device("cpu"))
    visual = torch.zeros(2, 8, dtype=torch.bool)
    for b, row in enumerate((row0, row1)):
        visual[b, 1 : 1 + len(row)] = True  # text at slot 0 (and the end of row 0)
        for name, column in zip(fields, zip(*row, strict=True), strict=True):
            layout.field(name)[b, 1 : 1 + len(row)] = torch.tensor(column)
    state = VisualTokenState.initial(visual, torch.ones_like(visual), layout)
    frames = Budget(keep=1, scope="frame").units(state)
    assert Budget.count(visual, frames).tolist() == [[7, 0, 0, 0], [2, 2, 2, 1]]
    crops = Budget(keep=1, scope="crop").units(state)
    assert Budget.count(visual, crops).tolist() == [[3, 2, 2], [2, 5, 0]]  # the newline goes with the base view
    images = Budget(keep=1, scope="image").units(state)
    assert Budget.count(visual, images).tolist() == [[7, 0], [2, 5]]


def test_top_k_keeps_the_best_candidates_of_each_unit_ties_to_the_lower_index():
    scores = torch.tensor([[5.0, 1.0, 1.0, 9.0, 1.0, 3.0, 3.0, 0.0]])
    candidates = torch.tensor([[True, True, True, False, True, True, True, True]])
    units = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    assert keep_top_k(scores, torch.tensor([2]), candidates)[0].nonzero().flatten().tolist() == [0, 5]
    kept = keep_top_k(scores, torch.tensor([[2, 1]]), candidates, units)
    assert kept[0].nonzero().flatten().tolist() == [0, 1, 5]  # a tie at 1.0 goes to slot 1; slot 3 is no candidate
    assert keep_top_k(scores, torch.tensor([[9, 9]]), candidates, units).equal(candidates)
    with pytest.raises(ValueError, match="need `units`"):
        keep_top_k(scores, torch.tensor([[2, 1]]), candidates)


def test_random_is_the_template_top_k_of_its_hash(family):
    """Random writes only score(); the kept set is the stable top-k of the hash over each row's visual tokens."""
    model = tiny(family)
    inputs, samples = batch_for(model, family)
    with vtc.apply(model, "random", keep=20, seed=3) as handle, torch.no_grad():
        model(**forward_inputs(family, inputs))
    for row, sample in enumerate(samples):
        n = int(adapter_for(model).visual_mask(sample["input_ids"], None).sum())
        hashes = token_hash(torch.arange(n), 3).double()
        expected = torch.sort(hashes, descending=True, stable=True).indices[:20].sort().values
        assert torch.equal(handle.stats.kept_visual()[row], expected)


@pytest.mark.parametrize("spec", ["random", "focusllava"])
def test_a_budget_per_image_keeps_that_many_of_every_image(family, spec):
    model = tiny(family)
    inputs, _ = batch_for(model, family, images=[1, 2])
    settings = {"vision_sampler": None} if spec == "focusllava" else {}
    with torch.no_grad():
        with vtc.apply(model, spec, keep=24, budget_scope="image", **settings) as handle:
            model(**forward_inputs(family, inputs))
            per_image = handle.stats.stages[-1].kept_positions
        with vtc.apply(model, spec, keep=24, **settings) as handle:
            model(**forward_inputs(family, inputs))
            per_row = handle.stats.stages[-1].kept_positions
    visual = adapter_for(model).visual_mask(inputs["input_ids"], None)
    second_start = int(visual[1].nonzero()[int(visual[1].sum()) // 2])  # the two-image row's second image
    assert [len(k) for k in per_image] == [24, 48] and [len(k) for k in per_row] == [24, 24]
    assert int((per_image[1] >= second_start).sum()) == 24  # 24 from each image of the two-image row
    assert torch.equal(per_image[0], per_row[0])  # one image: a row is that image


class _Leftmost(AttentionScoredPruner):
    """A template pruner whose tap prefers early slots; nothing registered."""

    name = "leftmost_budget_test"
    config_cls = RandomConfig

    def scored_layers(self, num_layers: int) -> tuple[int, ...]:
        return (0,)

    def tap(self, call):
        return -call.state.index.double()


def test_attention_template_realigns_its_tap_and_refuses_a_missing_one():
    visual = torch.tensor([[False, True, True, True, True, False]])
    state = VisualTokenState.initial(visual, torch.ones_like(visual))
    method = _Leftmost(RandomConfig(keep=2))
    ctx = LayerContext(1, torch.zeros(1, 6, 4), state, None)
    with pytest.raises(RuntimeError, match="layer 0 did not report its attention"):
        method.select(ctx)
    method.tapped[0] = (-state.index.double(), state.index)
    assert method.select(ctx)[0].nonzero().flatten().tolist() == [1, 2]
    later = state.gather(torch.tensor([[0, 2, 3, 4, 5]]), torch.ones(1, 5, dtype=torch.bool))  # slot 1 went
    kept = method.select(LayerContext(1, torch.zeros(1, 5, 4), later, None))
    assert later.index[0][kept[0]].tolist() == [2, 3]  # realigned by input position, not by slot


def test_realign_reads_values_with_trailing_dimensions_by_input_position():
    values = torch.arange(12.0).view(1, 6, 2)  # [B, L, 2]
    tapped = torch.arange(6)[None]
    index = torch.tensor([[0, 3, 5]])
    assert realign(values, tapped, index).tolist() == [[[0.0, 1.0], [6.0, 7.0], [10.0, 11.0]]]


PRUNERS = [m for m in vtc.list_methods() if get_method(m).prunes]
# Stages whose counts depend on the input are switched off, so that every count is the budget's.
FIXED = {"focusllava": {"vision_sampler": None}, "mustdrop": {"merge": "off", "key_set": False}}


@pytest.mark.parametrize("method", PRUNERS)
def test_every_pruner_takes_keep_keep_ratio_and_the_paper_presets(family, method):
    """keep=N and keep_ratio leave the counts they promise on every row; the presets r192 / r128 / r64 exist."""
    model = tiny(family)
    inputs, samples = batch_for(model, family)
    adapter = adapter_for(model)
    for form in ({"keep": 40}, {"keep_ratio": 0.25}, "r192", "r128", "r64"):
        spec, settings = (method, form) if isinstance(form, dict) else (f"{method}.{form}", {})
        config = vtc.resolve(spec, **settings, **FIXED.get(method, {}))
        with vtc.apply(model, config) as handle, torch.no_grad():
            model(**forward_inputs(family, inputs))
        for row, sample in enumerate(samples):
            n = int(adapter.visual_mask(sample["input_ids"], None).sum())
            text = sample["input_ids"].shape[1] - n
            got = [v[row] for v in handle.stats.visual_per_layer]
            assert got == get_method(method)(config).plan([n] * len(got), text), (spec, settings)
            if method == "sparsevlm" and "keep" in settings:  # its reading of a count: the paper's schedule
                promised = get_method(method)(vtc.resolve(method, keep_ratio=40 / n)).plan([n] * len(got), 0)
                assert got == promised
            elif "keep" in settings:
                assert got[-1] == min(40, n), (spec, got)
            elif settings and method != "sparsevlm":  # SparseVLM's keep_ratio: the interpolated schedule (plan)
                assert got[-1] == int(n * 0.25), (spec, got)
