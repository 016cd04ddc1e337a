"""`vtc eval` on Video-MME and MVBench through every video family's processor, without torchvision.

The families: Qwen2-VL and Qwen2.5-VL (vtc.eval.qwen), LLaVA-OneVision and LLaVA-NeXT-Video (vtc.eval.llava_video).
Each runs from a checkpoint saved in a temp folder, on fixtures in the datasets' own layouts (Video-MME's parquet
plus ``data/<videoID>.mp4`` with a real h264 clip; MVBench's ``json/<subtask>.json`` plus ``video/<source>/``, a
start / end window and a folder of frames). LLaVA-NeXT (images only) is refused a video task before any work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fixtures import (  # noqa: F401  (one_thread: autouse)
    MVBENCH_ROWS,
    image,
    one_thread,
    real_mp4,
    tiny_llava_video,
    tiny_qwen,
    write_mvbench_repo,
    write_videomme_hub,
)

from vtc.errors import VideoError
from vtc.eval.data import load_docs, locate_video
from vtc.eval.llava_video import FrameVideoProcessor
from vtc.eval.runner import read_predictions
from vtc.eval.tasks import get_task

pytest.importorskip("av")
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_next_video"]


def _clip(seed: int, frames: int = 3, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    return np.stack([np.asarray(image(seed + i, size)) for i in range(frames)])


# -- the processors ---------------------------------------------------------------------------------------------
def test_next_video_frames_are_the_clip_image_processors_pixels() -> None:
    """NeXT-Video's video processor is CLIP's image pipeline per frame: shortest edge, center crop, CLIP stats."""
    from transformers import CLIPImageProcessorPil

    videos = FrameVideoProcessor("llava_next_video", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip = _clip(0, size=(48, 40))  # 48 x 40 -> 38 x 32 -> 32 x 32 crop from the middle
    out = videos([clip, _clip(7, size=(40, 64))], return_tensors="pt")["pixel_values_videos"]
    assert tuple(out.shape) == (2, 3, 3, 32, 32)  # [videos, frames, channels, height, width]
    alone = images([image(i, (48, 40)) for i in range(3)], return_tensors="pt")["pixel_values"]
    assert np.abs(out[0].numpy() - alone.numpy()).max() < 1e-5
    assert videos.output_size(40, 48) == (32, 38) and videos.output_size(64, 40) == (51, 32)


def test_onevision_frames_are_resized_to_the_square_and_normalised() -> None:
    from transformers import SiglipImageProcessorPil

    from vtc.eval.llava_video import CLIP_MEAN, CLIP_STD

    videos = FrameVideoProcessor("llava_onevision", size={"height": 32, "width": 32})
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    out = videos(_clip(3, size=(48, 40)))["pixel_values_videos"]  # one clip as an array: a batch of one
    assert out.shape == (1, 3, 3, 32, 32) and out.dtype == np.float32
    alone = images([image(3 + i, (48, 40)) for i in range(3)])["pixel_values"]
    assert np.abs(out[0] - np.stack(alone)).max() < 1e-5
    assert videos.to_dict()["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert FrameVideoProcessor.from_config(videos.to_dict(), "llava_onevision").to_dict() == videos.to_dict()


def test_clips_of_different_lengths_in_one_batch_are_refused() -> None:
    videos = FrameVideoProcessor("llava_onevision", size={"height": 32, "width": 32})
    with pytest.raises(VideoError, match=r"different frame counts \(2, 3\).*--batch-size 1"):
        videos([_clip(0, 3), _clip(1, 2)])


def test_placeholders_that_do_not_fit_the_frames_are_errors(tmp_path, monkeypatch) -> None:
    """A chat template writing two video placeholders for one clip: the runner refuses the prompt; a prompt
    missing one placeholder of a clip's features: the forward refuses, and the runner says what to check."""
    import torch

    from vtc.eval.runner import _placeholders_explained, prepare

    model, processor = tiny_llava_video("llava_next_video")
    root = write_mvbench_repo(tmp_path / "MVBench")
    docs = load_docs(get_task("mvbench"), root)
    assert prepare(processor, get_task("mvbench"), docs[:1], 4)["pixel_values_videos"].shape[:2] == (1, 4)
    doubled = processor.chat_template.replace("{{ '<video>\n' }}", "{{ '<video>\n<video>\n' }}")
    assert doubled != processor.chat_template
    monkeypatch.setattr(processor, "chat_template", doubled)
    with pytest.raises(ValueError, match=r"holds 2 <video> placeholder\(s\) for 1 video\(s\).*chat template"):
        prepare(processor, get_task("mvbench"), docs[:1], 4)
    monkeypatch.undo()
    inputs = processor(text=["USER: <video> what ? ASSISTANT:"], videos=[_clip(0, 4)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_index).sum()) == 16  # 4 frames x (4 / 2)^2
    keep = inputs["input_ids"][0] != model.config.video_token_index
    keep[int((~keep).nonzero()[0])] = True  # one placeholder becomes text again: 15 for 16 features
    cut = {"input_ids": inputs["input_ids"][:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
    explained = r"do not match.*wrote a different number.*match the model's config"
    with pytest.raises(ValueError, match=explained), torch.inference_mode(), _placeholders_explained(model, processor):
        model(**cut, pixel_values_videos=inputs["pixel_values_videos"])


# -- the datasets' layouts --------------------------------------------------------------------------------------
def test_mvbench_repository_layout_reads_subtasks_windows_and_frame_folders(tmp_path) -> None:
    root = write_mvbench_repo(tmp_path / "MVBench")
    docs = load_docs(get_task("mvbench"), root)
    assert sorted(d["subtask"] for d in docs) == sorted(r[0] for r in MVBENCH_ROWS)
    found = {d["subtask"]: locate_video(d, "video") for d in docs}
    path, window = found["action_sequence"]
    assert path == root / "video/star/Charades_v1_480/ABC12.mp4" and window == {"start": 2.0, "end": 6.0}
    path, _ = found["episodic_reasoning"]
    assert path.is_dir() and path.parent.name == "frames_fps3_hq"
    # lmms-eval's cache keeps the same rows beside clips already cut to the window: the window no longer applies
    cut = tmp_path / "lmms" / "star" / "Charades_segment" / "ABC12.mp4"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(b"x")
    doc = {**next(d for d in docs if d["subtask"] == "action_sequence"), "_root": str(tmp_path / "lmms")}
    assert locate_video(doc, "video") == (cut, {})


def test_videomme_hub_layout_finds_clips_by_video_id(tmp_path) -> None:
    root = write_videomme_hub(tmp_path / "Video-MME")
    docs = load_docs(get_task("videomme"), root)
    assert [locate_video(d, "videoID")[0].name for d in docs] == ["vid0.mp4", "vid1.mp4", "vid2.mp4"]


# -- vtc eval end to end ------------------------------------------------------------------------------------------
def _family(family: str):
    return tiny_qwen(family) if family.startswith("qwen") else tiny_llava_video(family)


def _adapted(model) -> bool:
    from vtc.adapters import supported_model_types

    return model.config.model_type in supported_model_types()


#: visual tokens of 4 frames per family: Qwen a token per 16 x 16 pixels of frames grown to 128 x 128 per pair
#: of frames (the real 176 x 144 clip shrinks to 112 x 128); OneVision 4 x (4 / 2)^2 + a newline; NeXT-Video 4 x 4.
TOKENS = {"qwen2_vl": (128, 112), "qwen2_5_vl": (128, 112), "llava_onevision": (17, 17), "llava_next_video": (16, 16)}


@pytest.mark.parametrize("family", FAMILIES)
def test_vtc_eval_runs_videomme_and_mvbench_through_each_video_family(tmp_path, capsys, family) -> None:
    from vtc.cli import main

    model, processor = _family(family)
    saved = tmp_path / f"tiny-{family}"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    videomme = write_videomme_hub(tmp_path / "Video-MME")
    mvbench = write_mvbench_repo(tmp_path / "MVBench")
    methods = "dense,dart.r64" if _adapted(model) else "dense"
    argv = ["eval", "--model", str(saved), "--tasks", "videomme,mvbench", "--method", methods, "--frames", "4"]
    argv += ["--data", f"videomme={videomme}", "--data", f"mvbench={mvbench}", "--out", str(tmp_path / "runs")]
    argv += ["--batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--device", "cpu", "--dtype", "float32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for task in ("videomme", "mvbench"):
        for method in methods.split(","):
            assert f"| {task} | {method} |" in out
    dense, real = TOKENS[family]
    records = read_predictions(tmp_path / "runs" / "videomme" / "dense" / "predictions.jsonl")
    first = real if real_mp4() is not None else dense  # the first Video-MME clip is the real mp4
    assert [r["visual_tokens"] for r in records] == [first, dense, dense]
    assert all(isinstance(r["prediction"], str) and r["new_tokens"] >= 1 for r in records)
    records = read_predictions(tmp_path / "runs" / "mvbench" / "dense" / "predictions.jsonl")
    assert [r["visual_tokens"] for r in records] == [dense] * 3
    assert {r["subtask"] for r in records} == {r[0] for r in MVBENCH_ROWS}
    summary = json.loads((tmp_path / "runs" / "mvbench" / "dense" / "run.json").read_text())
    assert summary["frames"] == 4 and summary["model_type"] == family
    assert {f"mvbench/{r[0]}" for r in MVBENCH_ROWS} <= set(summary["metrics"])
    if "dart.r64" in methods:
        pruned = json.loads((tmp_path / "runs" / "videomme" / "dart.r64" / "run.json").read_text())
        assert pruned["method_configs"][0]["method"] == "dart"


def test_an_image_only_family_is_refused_a_video_task_before_any_work(tmp_path, capsys) -> None:
    from vtc.cli import main

    model, processor = tiny_llava_video("llava_next")
    saved = tmp_path / "tiny-llava-next"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    data = write_videomme_hub(tmp_path / "Video-MME")
    argv = ["eval", "--model", str(saved), "--tasks", "shapesqa,videomme", "--data", f"videomme={data}"]
    argv += ["--out", str(tmp_path / "runs"), "--no-progress", "--device", "cpu", "--limit", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "videomme is a video task, but the model takes images only (llava_next)" in err
    assert "--video-as-images" in err and "LLaVA-OneVision" in err
    assert not (tmp_path / "runs").exists()  # shapesqa, listed first, did not run either
