"""ShapesQA-Video: answers that follow from the drawn frames, balanced and held-out splits, lossless videos
that rerun to the same bytes, and the scoring and task the harness uses."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pytest

from vtc.eval import data, shapesqa, shapesqa_video
from vtc.eval.tasks import get_task
from vtc.eval.video import read_frames


def pixels_of(clip: shapesqa_video.Clip, t: int, name: str) -> np.ndarray:
    """``[N, 2]`` (x, y) of the pixels the named shape covers in frame ``t`` (empty when it is not there)."""
    scene = clip.scene(t)
    if name not in scene.names:
        return np.zeros((0, 2))
    ys, xs = np.nonzero(shapesqa.object_map(scene) == 1 + scene.names.index(name))
    return np.stack([xs, ys], axis=1)


def test_answers_follow_from_the_frames():
    """Every answer, recomputed from what each frame shows rather than from the tracks' parameters."""
    for row, clip in shapesqa_video.split_rows("val", 200):
        frames = [clip.scene(t) for t in range(clip.frames)]
        seen = [name for scene in frames for name in scene.names]
        q, a = row["question"], row["answer"]
        assert row["objects"] == clip.names and sorted(set(seen)) == sorted(clip.names)
        if row["type"] == "order":
            first = next(scene for scene in frames if scene.objects)
            assert len(first.objects) == 1 and first.objects[0].color == a
        elif row["type"] == "count":
            assert a == str(len(set(seen)))
        elif row["type"] == "direction":
            name = q.removeprefix("which way does the ").removesuffix(" move ?")
            shown = [t for t in range(clip.frames) if name in frames[t].names]
            start, end = pixels_of(clip, shown[0], name).mean(0), pixels_of(clip, shown[-1], name).mean(0)
            dx, dy = end - start
            assert max(abs(dx), abs(dy)) >= 23  # the centroid moves at least that far while visible
            expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert a == expected and min(abs(dx), abs(dy)) < 1  # a straight move along one axis
        else:
            name = q.removeprefix("is the ").removesuffix(" there at the end ?")
            assert name in seen  # a "no" is a shape that left, not one that never came
            assert (len(pixels_of(clip, clip.frames - 1, name)) > 0) == (a == "yes")


def test_clips_keep_their_shapes_apart_inside_the_frame():
    for seed in range(150):
        clip, _ = shapesqa_video.sample_conversation(seed)
        assert len(set(t.color for t in clip.tracks)) == len(clip.tracks) == len(set(t.shape for t in clip.tracks))
        assert len({t.enter for t in clip.tracks}) == len(clip.tracks)
        for t in range(clip.frames):
            scene = clip.scene(t)
            drawn = shapesqa.object_map(scene)
            for k, shape in enumerate(scene.objects):  # fully drawn: inside the frame, nothing covers it
                half = shape.size / 2
                assert half <= min(shape.x, shape.y) and max(shape.x, shape.y) <= scene.size - half
                area = (drawn == k + 1).sum()
                alone = shapesqa.object_map(shapesqa.Scene((shape,), scene.background, scene.pattern, 0, scene.size))
                assert area == (alone == 1).sum() > 0
        assert all(t.leave - t.enter + 1 >= shapesqa_video.MIN_VISIBLE for t in clip.tracks)


def test_splits_are_balanced():
    rows = [row for row, _ in shapesqa_video.split_rows("test", 160)]
    assert Counter(r["type"] for r in rows) == {t: 40 for t in shapesqa_video.TYPES}
    assert Counter(r["answer"] for r in rows if r["type"] == "end") == {"yes": 20, "no": 20}
    # no answer dominates a type: a constant guess stays far below the reference model's floor
    for kind in ("order", "direction", "count"):
        top = Counter(r["answer"] for r in rows if r["type"] == kind).most_common(1)[0][1]
        assert top / 40 <= 0.45, kind


def test_held_out_clips_are_not_in_the_training_stream():
    held_out = {clip for split in ("val", "test") for _, clip in shapesqa_video.split_rows(split, 150)}
    assert len(held_out) == 300
    seeds = random.Random(0).sample(range(shapesqa_video.TRAIN_SEEDS), 400) + list(range(200))
    stream = {shapesqa_video.sample_conversation(s)[0] for s in seeds}
    assert not held_out & stream
    assert shapesqa_video.sample_conversation(7) == shapesqa_video.sample_conversation(7)


def test_written_split_reruns_to_the_same_bytes_and_decodes_to_the_drawn_frames(tmp_path):
    pytest.importorskip("av")
    digests = []
    for root in (tmp_path / "a", tmp_path / "b"):
        shapesqa_video.write_split(root, "test", 6)
        files = [root / "test.jsonl", *sorted((root / "videos").iterdir())]
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
    assert digests[0] == digests[1] and len(digests[0]) == 7
    rows = shapesqa_video.read_split(tmp_path / "a", "test")
    for row, (_, clip) in zip(rows, shapesqa_video.split_rows("test", 6), strict=True):
        decoded = read_frames(tmp_path / "a" / row["video"], shapesqa_video.FRAMES, backend="pyav")
        assert np.array_equal(decoded, shapesqa_video.render(clip))  # lossless


def test_the_task_reads_a_split_and_scores_per_type(tmp_path):
    pytest.importorskip("av")
    shapesqa_video.write_split(tmp_path, "test", 8)
    task = get_task("shapesqa_video")
    assert task.modality == "video" and task.make_split is not None
    docs = data.load_docs(task, tmp_path)
    assert len(docs) == 8 and data.find_video(docs[0][task.visual], docs[0]["_root"]).is_file()
    records = [
        {"prediction": task.target(d) if i < 4 else "nothing", "target": task.target(d), "type": d["type"]}
        for i, d in enumerate(docs)
    ]
    metrics = task.score(records)
    assert metrics["accuracy"] == 0.5 and metrics["n"] == 8
    assert {metrics[f"acc_{t}"] for t in shapesqa_video.TYPES} == {0.5}  # rows 0-3 and 4-7: each type once right


def test_scoring_normalises_and_counts_per_type():
    rows = [{"type": "direction", "answer": "left"}, {"type": "count", "answer": "3"}, {"type": "end", "answer": "no"}]
    metrics = shapesqa_video.score(rows, ["Left.", "4", " no "])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert (metrics["acc_direction"], metrics["acc_count"], metrics["acc_end"]) == (1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="one prediction per row"):
        shapesqa_video.score(rows, ["left"])
    with pytest.raises(ValueError, match="held-out splits"):
        next(shapesqa_video.split_rows("train", 1))
