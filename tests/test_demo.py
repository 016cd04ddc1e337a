"""The demo compares methods at matched prefill FLOPs: the settings it picks for each budget."""

from __future__ import annotations

import pytest

from vtc.adapters import adapter_for
from vtc.demo import BUDGETS, TOLERANCE, at_budget, pruning_methods
from vtc.reference.model import IMAGE_SIZE, build_model


@pytest.mark.parametrize("image_size", [IMAGE_SIZE, 2 * IMAGE_SIZE], ids=["144-tokens", "576-tokens"])
def test_rows_of_one_budget_lie_within_ten_points_of_prefill_flops(image_size):
    model = build_model(image_size=image_size)  # the reference geometries (4 layers); weights do not matter
    dims, n_visual = adapter_for(model).dims(), model.config.image_seq_length
    for fraction in BUDGETS:
        settings = [at_budget(m, fraction, n_visual, dims, text_tokens=15) for m in pruning_methods()]
        assert {s.budget for s in settings} == {f"{round(fraction * 576)}/576"}
        matched = [s.planned for s in settings if s.matched]
        assert max(matched) - min(matched) <= TOLERANCE
        assert all(abs(s.planned - s.target) <= TOLERANCE for s in settings if s.matched)
        assert all(s.matched for s in settings if s.config.method != "gemfilter")  # only its pre-pass may not
        assert all(s.planned < 1.0 for s in settings)  # no pruned row costs more than dense
        (gemfilter,) = [s for s in settings if s.config.method == "gemfilter"]
        assert gemfilter.prepass and gemfilter.config.keep == round(fraction * n_visual)  # the budget's count
        assert "pre-pass" in gemfilter.note and not any(s.prepass for s in settings if s is not gemfilter)
        by_method = {s.config.method: s.config for s in settings}
        assert by_method["dart"].keep == by_method["random"].keep == round(fraction * n_visual)


def test_video_demo_runs_small(tmp_path, capsys):
    """``vtc demo --video`` on an untrained video reference model: the machinery, not the shipped weights."""
    from vtc.cli import main
    from vtc.reference.video import model as video

    video.build_model().save_pretrained(tmp_path)
    video.save_processor(video.build_tokenizer(), tmp_path)
    args = ["demo", "--video", "--model", str(tmp_path), "--methods", "dart,random", "--rows", "4", "--repeats", "1"]
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "129 visual tokens per 8-frame clip" in out and "on 4 held-out ShapesQA-Video questions" in out
    for setting in ("192/576 dart keep=43", "128/576 random keep=29", "64/576 dart keep=14"):
        assert setting in out
    header = next(line for line in out.splitlines() if line.strip().startswith("method"))
    assert all(t in header for t in ("order", "direction", "count", "end"))
    dense = next(line for line in out.splitlines() if line.strip().startswith("dense"))
    assert "100.0%" in dense and "129.0" in dense  # dense FLOPs relative to dense; every visual token kept
    kept = next(line for line in out.splitlines() if "64/576 dart keep=14" in line)
    assert " 14.0 " in kept  # the last layer sees the budget's tokens
