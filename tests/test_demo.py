"""The demo compares methods at matched prefill FLOPs: the settings it picks for each budget."""

from __future__ import annotations

import pytest

from vtc.adapters import adapter_for
from vtc.config import resolve
from vtc.demo import (
    BUDGETS,
    CALIBRATION,
    MERGE_KNOBS,
    TOLERANCE,
    Setting,
    at_budget,
    calibrate,
    label,
    pruning_methods,
)
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


def test_calibration_raises_a_merge_threshold_only_as_far_as_the_budgets_flops():
    setting = Setting(resolve("focusllava", keep=300), "192/576", target=0.6, planned=0.62, matched=True)
    asked = []

    def measure(config):  # a stand-in for measured FLOPs: the default merges most (0.25), 1.0 merges nothing
        asked.append(config.redundancy)
        return 0.25 + 0.37 * (config.redundancy - 0.9) / 0.1

    out = calibrate(setting, measure)
    lowest = 0.9 + (0.6 - CALIBRATION - 0.25) / 0.37 * 0.1  # the lowest threshold whose FLOPs reach the target
    assert lowest <= out.config.redundancy <= lowest + 0.1 / 2**5 + 1e-4  # five halvings of [0.9, 1.0]
    assert out.matched and 0.6 - CALIBRATION <= out.measured <= 0.6 and out.measured == measure(out.config)
    assert out.config.keep == 300 and setting.config.redundancy == 0.9  # the budget kept; the input unchanged
    assert len(asked) == 2 + 5 + 1  # the default, 1.0, five halvings, and the check above
    assert label(out.config) == f"focusllava keep=300 redundancy={out.config.redundancy:.4g}"
    assert label(setting.config) == "focusllava keep=300"


def test_calibration_says_when_even_no_merging_misses_the_target():
    setting = Setting(resolve("mustdrop", keep=200), "64/576", target=0.55, planned=0.56, matched=True)
    out = calibrate(setting, lambda config: 0.3)
    assert out.config.merge_threshold == 1.0 and not out.matched and "unmatched" in out.note
    reached = calibrate(setting, lambda config: 0.54)  # the default already reaches it: nothing changes
    assert reached.config == setting.config and reached.matched and reached.measured == 0.54
    dart = Setting(resolve("dart", keep=64), "64/576", target=0.55, planned=0.55, matched=True)
    assert calibrate(dart, lambda config: 1 / 0) == dart  # no merge: planned FLOPs are what it costs


def test_calibrated_rows_of_one_budget_lie_within_ten_points_as_measured():
    """On the shipped ShapesQA-hard model, whose one-colour backgrounds merge away unless calibrated."""
    import tempfile

    from vtc.demo import measured_ratio, settings_for
    from vtc.eval import shapesqa
    from vtc.reference import evaluate
    from vtc.reference import model as reference

    model, processor = reference.load(reference.HARD_WEIGHTS)
    with tempfile.TemporaryDirectory() as root:
        shapesqa.write_split(root, "test", 4, reference.variant_of(model))
        batch = evaluate.inputs_for(processor, shapesqa.read_split(root, "test")[:2], root)
    settings = settings_for(model, ["dart", "focusllava", "mustdrop"], model.config.image_seq_length, batch)
    for fraction in BUDGETS:
        rows = [s for s in settings if s.budget == f"{round(fraction * 576)}/576"]
        merged = [s for s in rows if s.config.method != "dart"]
        assert all(s.matched and s.target - CALIBRATION <= s.measured <= s.target + TOLERANCE for s in merged), rows
        for s in merged:  # the table's measure agrees
            assert measured_ratio(model, s.config, batch) == pytest.approx(s.measured)
        assert all(getattr(s.config, MERGE_KNOBS[s.config.method]) < 1.0 for s in merged)  # they still merge


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
