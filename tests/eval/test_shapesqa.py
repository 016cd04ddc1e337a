"""ShapesQA: answers that follow from the scenes, balanced splits, determinism, and the answer checks."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest

from vtc.eval import shapesqa


@pytest.mark.parametrize("geometry", [shapesqa.STANDARD, shapesqa.HARD], ids=lambda v: v.name)
def test_answers_follow_from_the_scene(geometry):
    for row, scene in shapesqa.split_rows("val", 300, geometry):
        by_name = {o.name: o for o in scene.objects}
        q, a = row["question"], row["answer"]
        assert row["objects"] == scene.names and len(set(scene.names)) == len(scene.names)
        if row["type"] == "exist":
            name = q.removeprefix("is there a ").removesuffix(" in the image ?")
            assert (name in by_name) == (a == "yes")
        elif row["type"] == "color":
            shape = q.removeprefix("what color is the ").removesuffix(" ?")
            (match,) = [o for o in scene.objects if o.shape == shape]  # asked only about a unique shape
            assert match.color == a
        elif row["type"] == "count":
            assert a == str(len(scene.objects))
        elif row["type"] == "position":
            between = " left or right of the " if "left" in q else " above or below the "
            first, rest = q.removeprefix("is the ").split(between)
            u, v = by_name[first], by_name[rest.removesuffix(" ?")]
            delta = (u.x - v.x) if "left" in q else (u.y - v.y)
            assert abs(delta) >= shapesqa.MIN_GAP
            assert a == ({True: "left", False: "right"} if "left" in q else {True: "above", False: "below"})[delta < 0]
        else:
            assert sorted(shapesqa.mentioned_objects(a)) == sorted(scene.names)


def test_hard_scenes_are_larger_and_fuller():
    """ShapesQA-hard: 192 px (24 x 24 patches of 8 px), 1 to 9 objects, every count asked, same questions."""
    rows = list(shapesqa.split_rows("test", 500, shapesqa.HARD))
    assert {scene.size for _, scene in rows} == {192}
    counts = Counter(int(r["answer"]) for r, _ in rows if r["type"] == "count")
    assert set(counts) == set(range(1, 10))
    for _, scene in rows:  # objects never overlap, and lie inside the image
        for a in scene.objects:
            assert shapesqa.HARD.min_side <= a.size <= shapesqa.HARD.max_side
            assert a.size / 2 <= a.x <= 192 - a.size / 2 and a.size / 2 <= a.y <= 192 - a.size / 2
    assert [r["question"] for r, _ in rows[:50]] != [r["question"] for r, _ in shapesqa.split_rows("test", 50)]
    assert shapesqa.variant("shapesqa_hard") is shapesqa.HARD
    with pytest.raises(ValueError, match="unknown ShapesQA variant 'huge'; the variants are shapesqa, shapesqa_hard"):
        shapesqa.variant("huge")


def test_pope_negatives_follow_their_subset():
    popular = shapesqa.popular_order()
    for row, scene in shapesqa.split_rows("test", 300):
        if row["type"] != "exist" or row["answer"] == "yes":
            continue
        name = row["question"].removeprefix("is there a ").removesuffix(" in the image ?")
        color, shape = name.split()
        assert name not in scene.names
        if row["pope"] == "popular":
            assert name == next(n for n in popular if n not in scene.names)
        elif row["pope"] == "adversarial":
            assert any(color == o.color or shape == o.shape for o in scene.objects)


def test_splits_are_balanced():
    rows = [row for row, _ in shapesqa.split_rows("test", 300)]
    assert Counter(r["type"] for r in rows) == {t: 60 for t in shapesqa.TYPES}
    exist = Counter((r["pope"], r["answer"]) for r in rows if r["type"] == "exist")
    assert set(exist.values()) == {10}  # 3 subsets x yes/no, 10 each


def test_written_split_is_deterministic_and_readable(tmp_path):
    digests = []
    for root in (tmp_path / "a", tmp_path / "b"):
        shapesqa.write_split(root, "test", 12)
        files = [root / "test.jsonl", *sorted((root / "images").iterdir())]
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
    assert digests[0] == digests[1]
    rows = shapesqa.read_split(tmp_path / "a", "test")
    assert len(rows) == 12 and set(rows[0]) == {"id", "image", "question", "answer", "type", "pope", "objects"}
    assert (tmp_path / "a" / rows[0]["image"]).is_file()


def test_training_stream_differs_from_held_out_scenes():
    scene, _ = shapesqa.sample_example(0)
    assert scene == shapesqa.sample_example(0)[0]
    assert shapesqa.sample_example(1)[0] != scene
    held_out = {scene for _, scene in shapesqa.split_rows("test", 200)}
    stream = {shapesqa.sample_example(s)[0] for s in random.Random(0).sample(range(shapesqa.TRAIN_SEEDS), 500)}
    assert not held_out & stream


@pytest.mark.parametrize(
    ("answer", "prediction", "ok"),
    [
        ("yes", "Yes.", True),
        ("yes", "yes , there is", False),
        ("3", " 3 ", True),
        ("left", "", False),
        ("a red circle and a blue star", "a blue star and a red circle", True),  # order does not matter
        ("a red circle and a blue star", "a red circle", False),  # a missing object
        ("a red circle", "a red circle and a red circle", False),  # an object named twice
        ("a red circle", "red circles", True),  # plural
    ],
)
def test_is_correct(answer, prediction, ok):
    kind = "describe" if answer.startswith("a ") else "exist"
    row = {"type": kind, "answer": answer, "objects": shapesqa.mentioned_objects(answer) if kind == "describe" else []}
    assert shapesqa.is_correct(row, prediction) is ok


def test_mentioned_objects_marks_a_missing_colour():
    assert shapesqa.mentioned_objects("a circle, two stars and a Blue square.") == ["? circle", "? star", "blue square"]
    assert shapesqa.mentioned_objects("two white crosses") == ["white cross"]  # plural in -es


def test_unknown_split_and_type_are_refused(tmp_path):
    with pytest.raises(ValueError, match="held-out splits are val, test"):
        next(shapesqa.split_rows("train", 1))
    with pytest.raises(ValueError, match="types are exist"):
        shapesqa.make_example(shapesqa.sample_example(0)[0], random.Random(0), "colour")
    with pytest.raises(FileNotFoundError, match="write_split"):
        shapesqa.read_split(tmp_path, "val")


def test_score_by_hand():
    rows = [
        {"type": "exist", "answer": "yes", "objects": ["red circle"]},
        {"type": "exist", "answer": "no", "objects": ["red circle"]},
        {"type": "exist", "answer": "no", "objects": ["red circle"]},
        {"type": "count", "answer": "2", "objects": ["red circle", "blue star"]},
        {"type": "describe", "answer": "a red circle and a blue star", "objects": ["red circle", "blue star"]},
        {"type": "describe", "answer": "a red circle", "objects": ["red circle"]},
    ]
    predictions = ["yes", "yes", "No.", "3", "a blue star and a red circle", "a red circle and a green cross"]
    got = shapesqa.score(rows, predictions)
    assert got["accuracy"] == pytest.approx(2 / 4)  # the four questions; descriptions are scored apart
    assert got["acc_exist"] == pytest.approx(2 / 3) and got["acc_count"] == 0 and got["acc_describe"] == 0.5
    # exist: tp 1, fp 1, fn 0 -> precision 1/2, recall 1, F1 2/3; two of three said yes.
    assert got["pope_precision"] == 0.5 and got["pope_recall"] == 1 and got["pope_f1"] == pytest.approx(2 / 3)
    assert got["pope_yes_ratio"] == pytest.approx(2 / 3)
    # describe: 4 objects named, 1 absent (green cross); 1 of 2 descriptions has one.
    assert got["chair_i"] == pytest.approx(1 / 4) and got["chair_s"] == 0.5
    with pytest.raises(ValueError, match="one prediction per row"):
        shapesqa.score(rows, predictions[:-1])


def test_conversations_pair_a_true_and_a_false_existence_question_and_end_with_the_description():
    for seed in range(50):
        scene, examples = shapesqa.sample_conversation(seed)
        assert examples == shapesqa.sample_conversation(seed)[1]
        exist = [ex for ex in examples if ex.type == "exist"]
        assert sorted(ex.answer for ex in exist) == ["no", "yes"]
        for ex in exist:
            name = ex.question.removeprefix("is there a ").removesuffix(" in the image ?")
            assert (name in scene.names) == (ex.answer == "yes"), (scene.names, ex)
        assert examples[-1].type == "describe" and examples[-1].answer == shapesqa.describe(scene)
        assert [ex.type for ex in examples].count("count") == 1
