"""Several methods in one model: stages at different layers chain, and rows stay independent."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import batch_for, forward_inputs, generate, tiny

import vtc

PAIRS = [
    ["gemfilter.r192", "dart.r64"],  # renumbered positions at layer 0, then original-position pruning at 2
    ["focusllava.r192", "dart.r64"],
    ["dart.r192", "sparsevlm.r64"],
]


@pytest.mark.parametrize("specs", PAIRS, ids="+".join)
def test_pairs_run_and_rows_stay_independent(family, specs):
    model = tiny(family)
    inputs, samples = batch_for(model, family)
    with torch.no_grad():
        base = model(**forward_inputs(family, inputs)).logits
        with vtc.apply(model, specs) as handle:
            batched = model(**forward_inputs(family, inputs)).logits[:, -1]
            assert {s.method for s in handle.stats.stages} == {s.split(".")[0] for s in specs}
            tokens = generate(model, inputs)
            for row, sample in enumerate(samples):
                torch.testing.assert_close(batched[row], model(**sample).logits[0, -1], atol=1e-4, rtol=1e-4)
                assert torch.equal(generate(model, sample)[0], tokens[row])
        assert torch.equal(model(**forward_inputs(family, inputs)).logits, base)


def test_a_later_stage_sees_only_what_earlier_ones_kept(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with vtc.apply(model, ["dart.r192", "sparsevlm.r64"]) as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    assert len(stats.stages) >= 2
    for earlier, later in itertools.pairwise(stats.stages):  # every row of every stage, not the first row only
        assert len(earlier.visual_after) == len(later.visual_after) == inputs["input_ids"].shape[0]
        assert all(a >= b for a, b in zip(earlier.visual_after, later.visual_after, strict=True))
    for earlier, later in itertools.pairwise(stats.stages):
        for kept_before, kept_after in zip(earlier.kept_positions, later.kept_positions, strict=True):
            assert torch.isin(kept_after, kept_before).all()
