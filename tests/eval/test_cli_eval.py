"""`vtc eval` and `vtc report` from the command line, on a tiny model saved to disk."""

from __future__ import annotations

import pytest
from eval_fixtures import one_thread, tiny_vlm, write_layout  # noqa: F401  (autouse)

from vtc.cli import main
from vtc.eval.report import plot_kept_patches


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model, processor = tiny_vlm()
    path = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_eval_then_report(tmp_path, saved_model, capsys) -> None:
    data = write_layout("pope_random", tmp_path / "pope")
    runs = tmp_path / "runs"
    argv = ["eval", "--model", str(saved_model), "--tasks", "pope_random", "--method", "dense,dart.r64"]
    argv += ["--data", f"pope_random={data}", "--out", str(runs), "--batch-size", "2", "--dtype", "float32"]
    argv += ["--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| pope_random | dense | f1 |" in out and "| pope_random | dart.r64 | f1 |" in out
    assert main(["report", str(runs), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    dense_row = next(line for line in table.splitlines() if "| dense |" in line)
    assert "| 100.0% |" in dense_row  # dense FLOPs vs dense
    pytest.importorskip("matplotlib")
    assert main(["report", str(runs), "--plots", str(tmp_path / "plots")]) == 0
    assert list((tmp_path / "plots").glob("*.png"))


def test_eval_on_the_shipped_model_needs_nothing_given(tmp_path, monkeypatch, capsys) -> None:
    """`vtc eval --model reference --tasks shapesqa`: the shipped weights by name, the split generated,
    cached, and read again from the cache the second time."""
    from vtc.eval.data import cache_root, load_docs
    from vtc.eval.tasks import get_task

    monkeypatch.setenv("VTC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", "reference", "--tasks", "shapesqa", "--method", "dense,dart.r64", "--limit", "6"]
    assert main([*argv, "--quiet", "--batch-size", "3"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    dense = next(line for line in out.splitlines() if line.startswith("| shapesqa | dense |"))
    assert "| 6 |" in dense  # six questions answered
    assert "shapesqa dense" not in captured.err  # --quiet: no progress bar
    assert main([*argv, "--batch-size", "3"]) == 0  # resumes: every answer is on disk already
    err = capsys.readouterr().err
    assert "shapesqa dense" in err and "6/6" in err  # the bar, with done/total (and an ETA)
    assert (tmp_path / "runs" / "reference").is_dir()
    split = cache_root() / "data" / "shapesqa" / "test" / "test.jsonl"
    assert split.is_file() and cache_root() == tmp_path / "cache"
    stamp = split.stat().st_mtime_ns
    docs = load_docs(get_task("shapesqa"), limit=3)
    assert split.stat().st_mtime_ns == stamp  # read from the cache, not written again
    assert [d["id"] for d in docs] == ["test-00000", "test-00001", "test-00002"]
    assert all((split.parent / d["image"]).is_file() for d in docs)


def test_vtc_list_names_the_eval_tasks(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    tasks = out.split("eval tasks")[1]
    assert "shapesqa" in tasks and "generated on first use" in tasks and "pope_random" in tasks


def test_missing_data_is_one_line(tmp_path, saved_model, capsys) -> None:
    argv = ["eval", "--model", str(saved_model), "--tasks", "mme", "--data", str(tmp_path / "none"), "--device", "cpu"]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none")]) == 2


def test_kept_patches_plot(tmp_path) -> None:
    from eval_fixtures import image

    import vtc

    model, processor = tiny_vlm()
    inputs = processor(text=["<image>\nred"], images=[image(0)], return_tensors="pt")
    with vtc.apply(model, "dart.r64") as handle:
        model(**inputs)
        kept = handle.stats.kept_visual()[0].tolist()
    assert 0 < len(kept) < 256 and max(kept) < 256  # patch indices of the 16 x 16 grid
    path = plot_kept_patches(image(0), kept, (16, 16), tmp_path / "kept.png")
    assert path.exists()


def test_reference_hard_names_the_shapesqa_hard_model_and_task() -> None:
    from vtc.eval.models import model_label, model_source
    from vtc.eval.tasks import get_task
    from vtc.reference.model import HARD_WEIGHTS, WEIGHTS

    assert model_source("reference-hard") == str(HARD_WEIGHTS) != str(WEIGHTS)
    assert model_label(HARD_WEIGHTS) == model_label("reference-hard") == "reference-hard"
    assert model_label(WEIGHTS) == "reference"
    assert get_task("shapesqa_hard").primary == get_task("shapesqa").primary == "accuracy"
