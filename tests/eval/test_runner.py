"""The runner end to end on tiny fixtures: every task, resume after a kill, batch 8 == batch 1."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import one_thread, tiny_vlm, write_layout  # noqa: F401  (autouse)

from vtc.eval.data import load_docs
from vtc.eval.runner import build_prompt, read_predictions, run_task
from vtc.eval.tasks import get_task

IMAGE_TASKS = ["pope_adversarial", "gqa", "mme", "textvqa", "vqav2", "scienceqa_img", "mmbench_en_dev", "seedbench"]


def _run(task_name, tmp_path, method="dense", batch_size=4, layout="jsonl", out="runs", **kw):
    task = get_task(task_name)
    root = write_layout(task_name, tmp_path / "data" / task_name, layout=layout, split=task.split)
    model, processor = tiny_vlm()
    docs = load_docs(task, root)
    summary = run_task(
        model, processor, task, docs, method, tmp_path / out, batch_size=batch_size, max_new_tokens=3,
        progress=False, frames=4, **kw,
    )  # fmt: skip
    return summary, tmp_path / out / task_name / method.replace("+", "__")


@pytest.mark.parametrize("task_name", [*IMAGE_TASKS, "shapesqa"])
def test_image_task_end_to_end(tmp_path, task_name) -> None:
    summary, run_dir = _run(task_name, tmp_path)
    task = get_task(task_name)
    assert task.primary in summary["metrics"]
    records = read_predictions(run_dir / "predictions.jsonl")
    assert len(records) == summary["efficiency"]["samples"] > 0
    assert all(isinstance(r["prediction"], str) for r in records)
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["metrics"] == summary["metrics"]
    assert saved["environment"]["transformers"]
    eff = saved["efficiency"]
    assert eff["visual_tokens"] == eff["visual_kept"] > 0  # dense keeps every visual token
    assert eff["flops_ratio"] == 1.0


@pytest.mark.parametrize("task_name", ["videomme", "mvbench"])
def test_video_task_end_to_end(tmp_path, task_name) -> None:
    """LLaVA-1.5 takes images only: a video task is refused unless its frames may go in as images."""
    pytest.importorskip("av")
    from vtc.errors import MissingCapabilityError

    with pytest.raises(MissingCapabilityError, match=f"{task_name} is a video task.*--video-as-images"):
        _run(task_name, tmp_path, batch_size=2)
    assert not (tmp_path / "runs" / task_name).exists()  # refused before any work
    summary, _ = _run(task_name, tmp_path, batch_size=2, video_as_images=True)
    assert summary["frames"] == 4 and summary["video_as_images"] is True
    assert summary["efficiency"]["visual_tokens"] == 4 * 256  # four frames, each an image to LLaVA


def test_parquet_data_end_to_end(tmp_path) -> None:
    pytest.importorskip("pyarrow")
    summary, _ = _run("mme", tmp_path, layout="parquet")
    assert "perception" in summary["metrics"]


def test_pruned_run_records_method_and_flops(tmp_path) -> None:
    summary, _ = _run("pope_adversarial", tmp_path, method="dart.r64")
    assert summary["method_configs"][0]["method"] == "dart"
    assert summary["efficiency"]["flops_ratio"] < 1.0
    assert summary["efficiency"]["visual_kept"] < summary["efficiency"]["visual_tokens"]


def test_batch_8_equals_batch_1(tmp_path) -> None:
    _, one = _run("pope", tmp_path, batch_size=1, out="b1")
    _, eight = _run("pope", tmp_path, batch_size=8, out="b8")
    preds = lambda d: [(r["id"], r["prediction"]) for r in read_predictions(d / "predictions.jsonl")]  # noqa: E731
    assert preds(one) == preds(eight)


def test_killed_run_resumes_to_the_same_scores(tmp_path, monkeypatch) -> None:
    full, _ = _run("pope", tmp_path, batch_size=2, out="full")
    model, _ = tiny_vlm()
    calls = {"n": 0}
    original = model.generate

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during the third batch
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        _run("pope", tmp_path, batch_size=2, out="killed")
    monkeypatch.undo()
    path = tmp_path / "killed" / "pope" / "dense" / "predictions.jsonl"
    assert len(read_predictions(path)) == 4  # two batches were saved
    with path.open("a") as f:
        f.write('{"id": "7", "predicti')  # a record cut off mid-write
    resumed, _ = _run("pope", tmp_path, batch_size=2, out="killed")
    assert resumed["metrics"] == full["metrics"]
    assert [r["id"] for r in read_predictions(path)] == [str(i) for i in range(9)]


def test_prompt_formats() -> None:
    _, processor = tiny_vlm()
    text = get_task("pope").text({"question": " Is there a dog? "})
    assert text == "Is there a dog?\nAnswer the question using a single word or phrase."
    prompt = build_prompt(processor, text, 1)
    assert prompt.startswith("A chat between a curious human") and prompt.endswith("phrase. ASSISTANT:")
    assert "USER: <image>\nIs there" in prompt
    mme = get_task("mme").text({"question": "Is it red? Please answer yes or no."})
    assert mme == "Is it red?\nAnswer the question using a single word or phrase."
