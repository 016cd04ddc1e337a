"""The demo compares methods at matched prefill FLOPs: the settings it picks for each budget."""

from __future__ import annotations

from vtc.adapters import adapter_for
from vtc.demo import BUDGETS, TOLERANCE, at_budget, pruning_methods
from vtc.reference.model import build_model


def test_rows_of_one_budget_lie_within_ten_points_of_prefill_flops():
    model = build_model()  # the reference geometry (4 layers, 144 visual tokens); weights do not matter
    dims, n_visual = adapter_for(model).dims(), model.config.image_seq_length
    for fraction in BUDGETS:
        settings = [at_budget(m, fraction, n_visual, dims, text_tokens=15) for m in pruning_methods()]
        assert {s.budget for s in settings} == {f"{round(fraction * 576)}/576"}
        matched = [s.planned for s in settings if s.matched]
        assert max(matched) - min(matched) <= TOLERANCE
        assert all(abs(s.planned - s.target) <= TOLERANCE for s in settings if s.matched)
        assert all(s.matched for s in settings if s.config.method != "gemfilter")  # only its pre-pass may not
        assert all(s.planned < 1.0 for s in settings)  # no pruned row costs more than dense
        by_method = {s.config.method: s.config for s in settings}
        assert by_method["dart"].keep == by_method["random"].keep == round(fraction * n_visual)
