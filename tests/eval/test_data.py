"""Data loaders: JSONL + media folder, parquet (hub snapshot), save_to_disk; errors that name the file."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import docs_for, write_layout

from vtc.eval.data import load_docs, load_images
from vtc.eval.tasks import get_task, list_tasks


def test_every_benchmark_is_registered() -> None:
    expected = {"pope_random", "pope_popular", "pope_adversarial", "gqa", "mme", "textvqa", "scienceqa_img"}
    expected |= {"mmbench_en_dev", "vqav2", "seedbench", "videomme", "mvbench", "shapesqa"}
    assert expected <= set(list_tasks())
    with pytest.raises(ValueError, match="Did you mean"):
        get_task("pope_randon")


def test_jsonl_with_image_folder(tmp_path) -> None:
    root = write_layout("pope_random", tmp_path)
    docs = load_docs(get_task("pope_random"), root)
    assert [d["category"] for d in docs] == ["random"] * 3  # filtered to its subset
    assert load_images(docs[0]["image"], docs[0]["_root"])[0].mode == "RGB"
    gqa = load_docs(get_task("gqa"), write_layout("gqa", tmp_path / "gqa", split="testdev"))
    assert gqa[0]["image"] == "n0.jpg"  # found through imageId


@pytest.mark.parametrize("layout", ["parquet", "saved"])
def test_parquet_and_save_to_disk(tmp_path, layout) -> None:
    pytest.importorskip("pyarrow")
    if layout == "saved":
        pytest.importorskip("datasets")
    task = get_task("seedbench")
    docs = load_docs(task, write_layout("seedbench", tmp_path, layout=layout))
    assert len(docs) == 4  # the video row is left out
    assert load_images(docs[0]["image"], None)[0].size == (48, 40)
    assert docs[0]["_id"] == "0"


def test_missing_and_malformed(tmp_path) -> None:
    task = get_task("mme")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_docs(task, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl"):
        load_docs(task, tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "Yes"}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl.*lack \['question_id', 'image', 'category'\]"):
        load_docs(task, bad)
    (bad / "test.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        load_docs(task, bad)


def test_missing_image_names_the_file(tmp_path) -> None:
    root = write_layout("gqa", tmp_path, split="testdev")
    (root / "n0.jpg").unlink()
    doc = load_docs(get_task("gqa"), root)[0]
    with pytest.raises(FileNotFoundError, match=r"n0\.jpg"):
        load_images(doc["image"], doc["_root"])


def test_duplicate_ids_are_made_unique(tmp_path) -> None:
    rows = docs_for("gqa")[:2]
    for r in rows:
        r["id"] = "same"
        r["image"] = "x.png"
    (tmp_path / "testdev.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    assert [d["_id"] for d in load_docs(get_task("gqa"), tmp_path)] == ["same", "same#2"]
