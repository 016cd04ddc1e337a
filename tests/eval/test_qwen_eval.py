"""`vtc eval` on Qwen2-VL and Qwen2.5-VL: chat template, several images per doc, videos through ``videos=``.

The tiny processor is built offline (eval_fixtures.tiny_qwen_processor); without torchvision its video
processor is vtc's own (vtc.eval.qwen.FrameVideoProcessor). Rows of a batch differ in size: images of
different sizes give different token counts, clips of different lengths different frame counts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fixtures import image, one_thread, tiny_qwen, write_layout, write_video  # noqa: F401  (autouse)

from vtc.eval.data import load_docs
from vtc.eval.runner import build_prompt, read_predictions, run_task
from vtc.eval.tasks import get_task

#: SEED-Bench docs as written below: image sizes per doc (doc 1 has two images).
SEED_SIZES = [[(48, 40)], [(48, 40), (96, 32)], [(200, 120)], [(64, 64)]]
#: Video-MME clips as written below: frames per clip (vtc samples at most 4 of them; the short clip keeps its 2).
CLIP_FRAMES = [6, 2, 5]


def _seed_layout(root):
    """SEED-Bench's layout with images of several sizes, and two images in one doc."""
    write_layout("seedbench", root)
    rows = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    for i, sizes in enumerate(SEED_SIZES):
        names = []
        for j, size in enumerate(sizes):
            name = f"images/{i}_{j}.png"
            image(10 * i + j, size).save(root / name)
            names.append(name)
        rows[i]["image"] = names
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _video_layout(root):
    """Video-MME's layout with clips of different lengths (and so different frame counts)."""
    write_layout("videomme", root)
    for i, frames in enumerate(CLIP_FRAMES):
        write_video(root / "data" / f"vid{i}.mp4", frames=frames, seed=i)
    return root


def _run(family, task_name, tmp_path, method="dense", batch_size=2, out="runs"):
    task = get_task(task_name)
    root = tmp_path / "data" / task_name
    if not root.exists():
        (_video_layout if task.modality == "video" else _seed_layout)(root)
    model, processor = tiny_qwen(family)
    docs = load_docs(task, root)
    summary = run_task(
        model, processor, task, docs, method, tmp_path / out, batch_size=batch_size, max_new_tokens=3,
        frames=4, short_videos="all", progress=False,
    )  # fmt: skip
    records = read_predictions(tmp_path / out / task_name / method.replace("+", "__") / "predictions.jsonl")
    return summary, docs, records


def test_processor_fits_the_tiny_models() -> None:
    for family in ("qwen2_vl", "qwen2_5_vl"):
        model, processor = tiny_qwen(family)
        config, vision = model.config, model.config.vision_config
        tok = processor.tokenizer
        assert processor.image_token_id == config.image_token_id
        assert processor.video_token_id == config.video_token_id
        ids = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
        assert ids == [config.vision_start_token_id, config.vision_end_token_id]
        assert tok.pad_token_id == config.pad_token_id and tok.eos_token_id == config.eos_token_id
        for part in (processor.image_processor, processor.video_processor):
            assert part.patch_size == vision.patch_size and part.merge_size == vision.spatial_merge_size
            assert part.temporal_patch_size == vision.temporal_patch_size


def test_prompts_put_visuals_first_in_one_user_turn() -> None:
    _, processor = tiny_qwen("qwen2_vl")
    text = get_task("seedbench").text(
        {"question": "What is shown?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d"}
    )
    assert text.endswith("\nAnswer with the option's letter from the given choices directly.")
    two = build_prompt(processor, text, 2)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert two.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert f"user\n{vision}{vision}What is shown?" in two
    assert two.endswith("directly.<|im_end|>\n<|im_start|>assistant\n")
    video = build_prompt(processor, "How many?", 0, video=True)
    assert "user\n<|vision_start|><|video_pad|><|vision_end|>How many?<|im_end|>" in video
    assert "<|image_pad|>" not in video


def test_frame_video_processor_patches_like_the_image_processor() -> None:
    """A still clip (one frame twice) is an image to Qwen's tower: the same patches in the same order."""
    from vtc.eval.qwen import FrameVideoProcessor

    _, processor = tiny_qwen("qwen2_vl")
    images = processor.image_processor
    budget = {"min_pixels": images.size["shortest_edge"], "max_pixels": images.size["longest_edge"]}
    videos = FrameVideoProcessor(patch_size=8, temporal_patch_size=2, merge_size=2, **budget)
    frame = np.asarray(image(3, (96, 64)))
    still = videos([np.stack([frame, frame])], return_tensors="pt")
    alone = images([image(3, (96, 64))], return_tensors="pt")
    # 96 x 64 grows to 208 x 144 within the pixel budget: 26 x 18 patches of 8 pixels
    assert still["video_grid_thw"].tolist() == alone["image_grid_thw"].tolist() == [[1, 18, 26]]
    assert np.abs(still["pixel_values_videos"].numpy() - alone["pixel_values"].numpy()).max() < 0.05
    odd = videos([np.stack([frame] * 3)])  # three frames: the last is repeated to fill the temporal patch
    assert odd["video_grid_thw"].tolist() == [[2, 18, 26]]
    assert videos.get_num_of_video_patches(3, 64, 96) == len(odd["pixel_values_videos"]) == 2 * 18 * 26


@pytest.mark.parametrize(
    ("family", "task_name"), [("qwen2_vl", "seedbench"), ("qwen2_vl", "videomme"), ("qwen2_5_vl", "seedbench")]
)
def test_dense_and_pruned_batch_2_equal_batch_1(tmp_path, family, task_name) -> None:
    pytest.importorskip("av")
    dense, docs, two = _run(family, task_name, tmp_path)
    _, _, one = _run(family, task_name, tmp_path, batch_size=1, out="b1")
    pruned, _, pruned_two = _run(family, task_name, tmp_path, method="dart.r64")
    _, _, pruned_one = _run(family, task_name, tmp_path, method="dart.r64", batch_size=1, out="b1")

    assert [r["id"] for r in two] == [d["_id"] for d in docs]  # one record per doc, in order
    assert all(r["prediction"] for r in two)  # every id of the tiny vocabulary decodes to a word
    preds = lambda records: [(r["id"], r["prediction"]) for r in records]  # noqa: E731
    assert preds(two) == preds(one)
    assert preds(pruned_two) == preds(pruned_one)

    tokens = [r["visual_tokens"] for r in two]
    if task_name == "videomme":
        # 32 x 32 frames grow to 128 x 128: 64 tokens per pair of frames; 6 and 5 frames -> 4, 2 -> 2
        assert tokens == [128, 64, 128]
        assert dense["frames"] == 4
    else:
        # a token per 16 x 16 pixels after smart_resize: 48 x 40 -> 176 x 160, 96 x 32 -> 288 x 96, ...
        assert tokens == [110, 110 + 108, 104, 100]
    assert [r["visual_tokens"] for r in pruned_two] == tokens
    assert all(d["visual_kept"] == d["visual_tokens"] for d in two)
    # DART at r64 keeps 4 pivots + 8 * 8 picks: rows with more visual tokens than that lose some
    for p, d in zip(pruned_two, two, strict=True):
        assert p["visual_kept"] < d["visual_tokens"] if d["visual_tokens"] > 68 else p["visual_kept"] == 64
    assert pruned["efficiency"]["flops_ratio"] < 1.0 == dense["efficiency"]["flops_ratio"]
    assert pruned["method_configs"][0]["method"] == "dart"


def test_cli_eval_on_a_saved_qwen(tmp_path, capsys) -> None:
    """`vtc eval` on a saved tiny Qwen2-VL: AutoProcessor needs torchvision for the video processor; where it
    is missing, vtc builds the processor from the saved files with its own video processor."""
    pytest.importorskip("av")
    from vtc.cli import main

    model, processor = tiny_qwen("qwen2_vl")
    saved = tmp_path / "tiny-qwen2-vl"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    data = _video_layout(tmp_path / "videomme")
    argv = ["eval", "--model", str(saved), "--tasks", "videomme", "--method", "dense,dart.r64", "--frames", "4"]
    argv += ["--short-videos", "all"]  # the 2-frame clip keeps its 2 frames
    argv += ["--data", f"videomme={data}", "--out", str(tmp_path / "runs"), "--batch-size", "2", "--dtype", "float32"]
    assert main([*argv, "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| videomme | dense |" in out and "| videomme | dart.r64 |" in out
    runs = sorted((tmp_path / "runs").rglob("predictions.jsonl"))
    assert [p.parent.name for p in runs] == ["dart.r64", "dense"]
    for path in runs:
        assert [r["visual_tokens"] for r in read_predictions(path)] == [128, 64, 128]

    from vtc.eval.models import load
    from vtc.eval.qwen import FrameVideoProcessor

    _, loaded = load(saved, device="cpu")
    assert loaded.chat_template == processor.chat_template
    assert loaded.video_processor.to_dict()["size"] == processor.video_processor.to_dict()["size"]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert isinstance(loaded.video_processor, FrameVideoProcessor)
