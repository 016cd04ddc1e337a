"""The reference model: a stock LLaVA whose processor and weights round-trip, its training step, and the
shipped weights answering held-out ShapesQA questions."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtc.eval import shapesqa
from vtc.reference import evaluate
from vtc.reference import model as reference
from vtc.reference.train import main as train_main
from vtc.reference.train import training_batch


def test_processor_round_trips_and_expands_the_image(tmp_path):
    processor = reference.build_processor()
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    scene, ex = shapesqa.sample_example(0)
    image = shapesqa.render(scene)
    a = processor(images=[image], text=[reference.prompt(ex.question)], return_tensors="pt")
    b = loaded(images=[image], text=[reference.prompt(ex.question)], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    image_id = loaded.tokenizer.convert_tokens_to_ids(reference.IMAGE_TOKEN)
    assert int((b["input_ids"] == image_id).sum()) == 144
    assert "<unk>" not in loaded.tokenizer.decode(b["input_ids"][0])
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
    assert loaded.apply_chat_template(chat, add_generation_prompt=True) == reference.prompt(ex.question)


def test_every_shapesqa_word_is_in_the_vocabulary():
    tok = reference.build_tokenizer()
    for row, _ in shapesqa.split_rows("val", 100):
        ids = tok(f"{row['question']} {row['answer']}", add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, row


def test_model_round_trips_through_from_pretrained(tmp_path):
    model = reference.build_model().eval()
    model.save_pretrained(tmp_path)
    reference.build_processor().save_pretrained(tmp_path)
    loaded, processor = reference.load(tmp_path)
    assert type(loaded) is LlavaForConditionalGeneration
    inputs = training_batch(processor, step=0, batch=2, seed=0)
    inputs.pop("labels")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_labels_cover_the_answer_and_eos_only():
    processor = reference.build_processor()
    batch = training_batch(processor, step=3, batch=4, seed=0)
    for i in range(4):
        _, ex = shapesqa.sample_example(3 * 4 + i)
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert processor.tokenizer.decode(labelled) == f"{ex.answer} </s>"


def test_training_script_writes_a_loadable_model(tmp_path):
    assert train_main(["--out", str(tmp_path), "--steps", "2", "--batch", "4", "--eval-rows", "5"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"accuracy", "acc_exist", "acc_describe", "steps"} <= set(metrics)
    assert "step     1" in (tmp_path / "train_log.txt").read_text()
    model, _ = reference.load(tmp_path)
    assert next(model.parameters()).dtype == torch.float32  # stored in fp16, loaded in the dtype asked for


def test_load_names_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        reference.load(tmp_path / "nothing")


def test_shipped_model_sees_the_image(tmp_path):
    """The shipped weights answer from the image: counting and colour well above chance (25% and 17%).

    The model is below the 90% the reference issue asks for; existence and position questions are at
    chance (docs/REFERENCE.md). This pins what it does learn, so a broken loader or processor shows.
    """
    model, processor = reference.load()
    shapesqa.write_split(tmp_path, "test", 100)
    rows = shapesqa.read_split(tmp_path, "test")
    metrics = shapesqa.score(rows, evaluate.predict(model, processor, rows, tmp_path))
    assert metrics["acc_count"] >= 0.6, metrics
    assert metrics["acc_color"] >= 0.4, metrics
