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
from vtc.reference.train import answer_loss, training_batch
from vtc.reference.train import main as train_main


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


def test_conversation_rows_label_every_answer_and_weigh_each_once():
    processor = reference.build_processor()
    batch = training_batch(processor, step=1, batch=3, seed=0, turns=7)
    tok = processor.tokenizer
    for i in range(3):
        _, examples = shapesqa.sample_conversation(1 * 3 + i)
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == " ".join(f"{ex.answer} </s>" for ex in examples)
        assert examples[-1].type == "describe" and len(examples) >= 5
        weights = batch["answer_weights"][i]
        assert torch.equal(weights > 0, batch["labels"][i] != -100)
        assert weights.sum().item() == pytest.approx(len(examples))  # every answer sums to one


def test_early_targets_sit_on_the_last_named_shape_of_each_question():
    processor = reference.build_processor()
    batch = training_batch(processor, step=2, batch=4, seed=0, turns=7)
    tok = processor.tokenizer
    seen = 0
    for i in range(4):
        _, examples = shapesqa.sample_conversation(2 * 4 + i)
        ids, early = batch["input_ids"][i], batch["early_targets"][i]
        at = (early != -100).nonzero().flatten().tolist()
        expected = [ex for ex in examples if ex.type in ("exist", "color", "position")]
        assert [tok.decode(early[t]) for t in at] == [ex.answer for ex in expected]
        for t, ex in zip(at, expected, strict=True):
            assert tok.decode(ids[t]) == [w for w in ex.question.split() if w in shapesqa.SHAPES][-1]
            assert tok.decode(ids[t + 1]) == ("in" if ex.type == "exist" else "?")  # the question's last shape
        seen += len(at)
    assert seen >= 8


def test_answer_loss_weighs_answers_not_tokens():
    labels = torch.tensor([[-100, 5, 6, 7, -100, 8]])  # a 3-token answer, then a 1-token one
    weights = torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 1.0]])
    logits = torch.zeros(1, 6, 10)
    logits[0, 0, 5] = logits[0, 1, 6] = logits[0, 2, 7] = 50.0  # the long answer is right, the short one not
    loss = answer_loss(logits, labels, weights)
    wrong = torch.nn.functional.cross_entropy(logits[0, 4:5], labels[0, 5:6])
    assert loss.item() == pytest.approx(wrong.item() / 2, rel=1e-5)


def test_training_script_writes_a_loadable_model(tmp_path):
    assert train_main(["--out", str(tmp_path), "--steps", "2", "--batch", "4", "--eval-rows", "5"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"accuracy", "acc_exist", "acc_describe", "steps"} <= set(metrics)
    assert "step     1" in (tmp_path / "train_log.txt").read_text()
    model, _ = reference.load(tmp_path)
    assert next(model.parameters()).dtype == torch.float32  # stored in fp16, loaded in the dtype asked for


def test_a_rerun_retraces_the_run_bit_for_bit(tmp_path):
    """Seeded data, seeded init and a fixed thread count: two runs write the same bytes."""
    args = ["--steps", "3", "--batch", "2", "--turns", "3", "--eval-rows", "5"]
    for name in ("a", "b"):
        assert train_main(["--out", str(tmp_path / name), *args]) == 0
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b
    trained, _ = reference.load(tmp_path / "a", dtype=torch.float16)
    fresh = reference.build_model().to(torch.float16)
    assert not all(torch.equal(p, q) for p, q in zip(fresh.parameters(), trained.parameters(), strict=True))


def test_load_names_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        reference.load(tmp_path / "nothing")


def test_shipped_model_sees_the_image(tmp_path):
    """The shipped weights answer from the image: counting, colour and existence well above chance.

    The model is below the 90% the reference issue asks for, and answers position questions at chance
    (docs/REFERENCE.md). This pins what it does learn, so a broken loader or processor shows.
    """
    model, processor = reference.load()
    shapesqa.write_split(tmp_path, "test", 100)
    rows = shapesqa.read_split(tmp_path, "test")
    metrics = shapesqa.score(rows, evaluate.predict(model, processor, rows, tmp_path))
    assert metrics["acc_count"] >= 0.6, metrics  # chance 25%
    assert metrics["acc_color"] >= 0.4, metrics  # chance 17%
    assert metrics["acc_exist"] >= 0.7, metrics  # chance 50%, yes and no balanced
