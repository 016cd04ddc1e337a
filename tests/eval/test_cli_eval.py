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


def test_lmms_bridge_registers() -> None:
    pytest.importorskip("lmms_eval")
    from vtc.eval.lmms import VTC, manifest

    assert manifest().model_id == "vtc"
    assert VTC.is_simple
