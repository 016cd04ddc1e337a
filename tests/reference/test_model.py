"""The reference model: a stock LLaVA whose processor and weights round-trip, its training step, and the
shipped weights answering held-out ShapesQA questions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtc.eval import shapesqa
from vtc.reference import evaluate
from vtc.reference import model as reference
from vtc.reference.taps import AttentionTaps
from vtc.reference.targets import coverage, named_objects, reply_positions
from vtc.reference.train import (
    Looks,
    answer_loss,
    tower_loss,
    training_batch,
    visual_dropout,
    warm_start,
)
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


def test_type_weights_scale_only_the_answers_of_that_type():
    processor = reference.build_processor()
    plain = training_batch(processor, step=1, batch=3, seed=0, turns=7)
    weighed = training_batch(processor, step=1, batch=3, seed=0, turns=7, type_weights={"count": 3.0})
    assert torch.equal(plain["labels"], weighed["labels"])
    for i in range(3):
        _, examples = shapesqa.sample_conversation(1 * 3 + i)
        labelled = (plain["labels"][i] != -100).nonzero().flatten()
        ratio = weighed["answer_weights"][i][labelled] / plain["answer_weights"][i][labelled]
        # the labelled tokens in order, each tagged with its answer's type
        types = [ex.type for ex in examples for _ in tokens_of(processor.tokenizer, ex.answer)]
        assert ratio.tolist() == pytest.approx([3.0 if t == "count" else 1.0 for t in types])
        assert "count" in types


def tokens_of(tokenizer, answer: str) -> list[int]:
    """The labelled tokens of one answer: its words and ``</s>``."""
    return tokenizer(f"{answer} {tokenizer.eos_token}", add_special_tokens=False)["input_ids"]


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


def test_named_objects_are_the_ones_a_question_singles_out():
    shape = shapesqa.Shape
    scene = shapesqa.Scene(
        (shape("red", "circle", 20, 20, 20), shape("blue", "circle", 70, 20, 20), shape("green", "star", 45, 70, 20)),
        (120, 120, 120), "noise", 0,
    )  # fmt: skip
    assert named_objects(scene, "is there a blue circle in the image ?") == [(4, 1)]
    assert named_objects(scene, "what color is the star ?") == [(4, 2)]
    assert named_objects(scene, "what color is the circle ?") == []  # two circles: no single one
    assert named_objects(scene, "is there a red star in the image ?") == []  # absent
    question = "is the green star above or below the red circle ?"
    assert named_objects(scene, question) == [(3, 2), (9, 0)]


def test_attention_targets_point_from_each_name_to_its_object():
    processor = reference.build_processor()
    batch = training_batch(processor, step=5, batch=4, seed=0, patch=reference.PATCH, turns=7)
    tok = processor.tokenizer
    index, patches = batch["attend_index"], batch["attend_patches"]
    expected = 0
    for i in range(4):
        scene, examples = shapesqa.sample_conversation(5 * 4 + i)
        cover = coverage(scene, reference.PATCH) >= 0.25
        named = [obj for ex in examples for _, obj in named_objects(scene, ex.question)]
        named += [obj for _, obj in named_objects(scene, examples[-1].answer)]  # the description's, last
        rows = (index[:, 0] == i).nonzero().flatten().tolist()
        assert len(rows) == len(named)
        for n, obj in zip(rows, named, strict=True):
            assert tok.decode(batch["input_ids"][i, index[n, 1]]) == scene.objects[obj].shape
            assert torch.equal(patches[n], cover[obj]) and patches[n].any()
            o = scene.objects[obj]
            row, col = batch["attend_cells"][n].tolist()
            assert (row, col) == (int(o.y) // reference.PATCH, int(o.x) // reference.PATCH)
        expected += len(named)
    assert len(index) == expected >= 8


def test_answer_loss_weighs_answers_not_tokens():
    labels = torch.tensor([[-100, 5, 6, 7, -100, 8]])  # a 3-token answer, then a 1-token one
    weights = torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3, 0.0, 1.0]])
    logits = torch.zeros(1, 6, 10)
    logits[0, 0, 5] = logits[0, 1, 6] = logits[0, 2, 7] = 50.0  # the long answer is right, the short one not
    loss = answer_loss(logits, labels, weights)
    wrong = torch.nn.functional.cross_entropy(logits[0, 4:5], labels[0, 5:6])
    assert loss.item() == pytest.approx(wrong.item() / 2, rel=1e-5)


def test_every_kth_row_is_the_description_alone_and_its_names_find_their_objects():
    processor = reference.build_processor()
    batch = training_batch(processor, step=6, batch=8, seed=0, patch=reference.PATCH, turns=7, describe_every=4)
    tok = processor.tokenizer
    for i in range(8):
        scene, examples = shapesqa.sample_conversation(6 * 8 + i)
        text = tok.decode(batch["input_ids"][i], skip_special_tokens=True)
        if i % 4 == 3:
            assert text.count("USER") == 1 and "describe the image" in text
            named = [int(t) for r, t in batch["attend_index"].tolist() if r == i]
            assert [tok.decode(batch["input_ids"][i, t]) for t in named] == [o.shape for o in
                sorted(scene.objects, key=lambda o: o.x)]  # fmt: skip
        else:
            assert text.count("USER") == len(examples)


def test_relays_link_the_two_names_and_the_reply_to_the_last_name():
    processor = reference.build_processor()
    batch = training_batch(processor, step=4, batch=4, seed=0, patch=reference.PATCH, turns=7)
    tok = processor.tokenizer
    words = lambda i, t: tok.decode(batch["input_ids"][i, t])  # noqa: E731
    replies, links = batch["replies"].tolist(), batch["links"].tolist()
    for i in range(4):
        _, examples = shapesqa.sample_conversation(4 * 4 + i)
        early = [ex for ex in examples if ex.type in ("exist", "color", "position")]
        mine = [(f, t) for r, f, t in replies if r == i]
        assert len(mine) == len(early)
        for (f, t), ex in zip(mine, early, strict=True):
            assert (words(i, f - 1), words(i, f)) == ("ASSISTANT", ":")
            assert words(i, t) == [w for w in ex.question.split() if w in shapesqa.SHAPES][-1]
            assert t < f and ":" not in tok.decode(batch["input_ids"][i, t : f - 2])  # the same turn's question
        pairs = [ex for ex in examples if ex.type == "position"]
        mine = [(f, t) for r, f, t in links if r == i]
        assert len(mine) == len(pairs)
        for (f, t), ex in zip(mine, pairs, strict=True):
            first, second = (w for w in ex.question.split() if w in shapesqa.SHAPES)
            assert (words(i, t), words(i, f)) == (first, second) and t < f
    assert len(links) >= 2


def test_filter_targets_point_each_reply_at_its_questions_objects():
    processor = reference.build_processor()
    batch = training_batch(processor, step=2, batch=4, seed=0, patch=reference.PATCH, turns=7)
    tok = processor.tokenizer
    index, patches = batch["filter_index"], batch["filter_patches"]
    for i in range(4):
        scene, examples = shapesqa.sample_conversation(2 * 4 + i)
        cover = coverage(scene, reference.PATCH) >= 0.25
        mine = [k for k, (r, _) in enumerate(index.tolist()) if r == i]
        assert [int(index[k, 1]) for k in mine] == reply_positions(batch["input_ids"][i].tolist(), tok)
        for k, ex in zip(mine, examples, strict=True):
            named = {obj for _, obj in named_objects(scene, ex.question)}
            want = cover[sorted(named)].any(0) if named and ex.type != "describe" else cover.any(0)
            assert torch.equal(patches[k], want), ex  # the named objects, or every object (counts, absences)


def test_taps_read_the_rows_eager_attention_returns():
    """The sdpa implementation with taps gives the losses the attention rows eager returns, and the same logits."""
    processor = reference.build_processor()
    inputs = training_batch(processor, step=0, batch=3, seed=0, patch=reference.PATCH, turns=7)
    model_in = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    relays = ((inputs["links"], 2), (inputs["replies"], 3))
    read = {}
    for mode in ("eager", "taps"):
        model = reference.build_model(0, "eager" if mode == "eager" else "sdpa")
        taps = None
        if mode == "taps":
            taps = AttentionTaps()
            taps.install(model.config.text_config)
        looks = Looks(taps, inputs["attend_index"], relays, inputs["filter_index"], 1, 1, 4)
        with torch.no_grad():
            output = model(**model_in, output_attentions=mode == "eager")
        looks.read(output)
        read[mode] = looks, output.logits[inputs["attention_mask"].bool()]
    (eager, eager_logits), (tapped, tapped_logits) = read["eager"], read["taps"]
    assert tapped.found.shape == (len(inputs["attend_index"]), inputs["input_ids"].shape[1])
    torch.testing.assert_close(tapped.found, eager.found)
    torch.testing.assert_close(tapped.filtered, eager.filtered)
    assert len(tapped.relayed) == len(eager.relayed) == 2
    for a, b in zip(tapped.relayed, eager.relayed, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(tapped_logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_warm_start_resizes_the_towers_positions_and_keeps_everything_else(tmp_path):
    small = reference.build_model(seed=1)
    small.save_pretrained(tmp_path)
    reference.build_processor().save_pretrained(tmp_path)
    large = reference.build_model(seed=2, image_size=2 * reference.IMAGE_SIZE)
    assert large.config.image_seq_length == 576
    assert "12x12 -> 24x24" in warm_start(large, tmp_path)
    a, b = small.state_dict(), large.state_dict()
    name = next(k for k in a if k.endswith("position_embedding.weight"))
    assert a[name].shape == (145, 128) and b[name].shape == (577, 128)
    torch.testing.assert_close(b[name][0], a[name][0])  # the class position
    grid = b[name][1:].reshape(24, 24, -1)
    assert grid[0, 0].sub(a[name][1]).abs().max() < grid[0, 0].sub(a[name][144]).abs().max()  # corners stay put
    assert all(torch.equal(a[k], b[k]) for k in a if k != name and "position_ids" not in k)
    assert reference.variant_of(large) is shapesqa.HARD and reference.variant_of(small) is shapesqa.STANDARD


def test_tower_loss_scores_shapes_on_objects_only():
    targets = torch.tensor([[[0, 3, 3], [0, 2, 5]]])  # [B, 2, P]: a background patch, then two object patches
    aux = torch.zeros(1, 3, 14)
    aux[0, :, :7] = torch.nn.functional.one_hot(targets[0, 0], 7) * 30.0  # colours (and background) right
    aux[0, 1:, 7:] = torch.nn.functional.one_hot(targets[0, 1, 1:], 7) * 30.0  # shapes right on the objects
    assert tower_loss(aux, targets).item() < 1e-6
    aux[0, 0, 7:] = torch.randn(7) * 30.0  # whatever the background's shape logits say
    assert tower_loss(aux, targets).item() < 1e-6
    aux[0, 2, 7:] = 0.0  # an object patch's shape unknown: the loss rises by half of log 7 (two object patches)
    assert tower_loss(aux, targets).item() == pytest.approx(math.log(7) / 2, rel=1e-4)


def test_visual_dropout_hides_tokens_as_a_pruner_would():
    """Picked rows lose background only (objects kept) or a drawn share of any tokens, renumbered or not."""
    batch, patches, text = 200, 36, 5
    mask = torch.ones(batch, text + patches + text, dtype=torch.long)
    mask[0, -2:] = 0  # padding stays padding
    image_at = (torch.arange(patches) + text).expand(batch, -1)
    touched = torch.zeros(batch, patches, dtype=torch.bool)
    touched[:, :4] = True
    before = mask.clone()
    out, positions, picked = visual_dropout(mask, image_at, touched, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(mask, before) and 60 < int(picked.sum()) < 140  # the input unchanged; about half picked
    assert torch.equal(out[~picked], mask[~picked])
    assert torch.equal(out[:, :text], mask[:, :text]) and torch.equal(out[:, -text:], mask[:, -text:])
    visible = out.gather(1, image_at).bool()[picked]
    objects_kept = visible[:, :4].all(dim=1)
    some_lost = visible.sum(dim=1) < patches
    assert (objects_kept & some_lost).any() and (~objects_kept).any()  # background only, and any tokens
    drawn = visible[~objects_kept].sum(dim=1)  # the rows that lost any tokens keep 8% to 50% of them
    assert (drawn >= round(0.08 * patches)).all() and (drawn <= round(0.5 * patches)).all()
    arange = torch.arange(mask.shape[1])
    fresh = picked & (positions != arange).any(dim=1)
    assert fresh.any() and (picked & ~fresh).any()
    assert torch.equal(positions[~picked], arange.expand(int((~picked).sum()), -1))
    for row in fresh.nonzero()[:, 0].tolist():  # the visible tokens numbered 0, 1, 2, ...
        assert torch.equal(positions[row][out[row].bool()], torch.arange(int(out[row].sum())))
    again = visual_dropout(mask, image_at, touched, 0.5, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, (out, positions, picked), strict=True))  # seeded


def test_training_script_writes_a_loadable_model(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "2", "--batch", "4", "--eval-rows", "5", "--tower-steps", "2"]
    assert train_main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"accuracy", "acc_exist", "acc_describe", "steps"} <= set(metrics)
    log = (tmp_path / "train_log.txt").read_text()
    assert "tower     1" in log and "step     1" in log and "found" in log  # both stages, the attention loss
    model, _ = reference.load(tmp_path)
    assert next(model.parameters()).dtype == torch.float32  # stored in fp16, loaded in the dtype asked for


def test_a_rerun_retraces_the_run_bit_for_bit(tmp_path):
    """Seeded data, seeded init and a fixed thread count: two runs write the same bytes (visual dropout too)."""
    args = ["--steps", "3", "--batch", "2", "--turns", "3", "--eval-rows", "5", "--tower-steps", "2"]
    args += ["--visual-dropout", "0.5"]
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


def test_shipped_model_answers_every_question_type(tmp_path):
    """The shipped weights answer held-out questions of every type from the image, and describe it.

    On 1,000 `val` rows they score 98% (docs/REFERENCE.md); these floors, on 100 `test` rows (20 per
    type), leave room for sampling and catch a broken loader, processor or chat format.
    """
    model, processor = reference.load()
    shapesqa.write_split(tmp_path, "test", 100)
    rows = shapesqa.read_split(tmp_path, "test")
    metrics = shapesqa.score(rows, evaluate.predict(model, processor, rows, tmp_path))
    for kind in shapesqa.QUESTION_TYPES:  # chance: exist 50%, colour 17%, count 25%, position 50%
        assert metrics[f"acc_{kind}"] >= 0.85, (kind, metrics)
    assert metrics["acc_describe"] >= 0.5, metrics  # exactly the scene's objects, left to right; chance ~0
    assert metrics["chair_i"] <= 0.1, metrics  # few objects named that the scene lacks


def test_shipped_hard_model_answers_shapesqa_hard(tmp_path):
    """The ShapesQA-hard weights (576 visual tokens) answer held-out questions from the image.

    docs/REFERENCE.md has the 1,000-question figures (90.4% dense; counts are the weak type); these floors,
    on 40 questions, leave room for sampling and catch a broken loader, processor or geometry.
    """
    model, processor = reference.load(reference.HARD_WEIGHTS)
    assert model.config.image_seq_length == 576 and reference.variant_of(model) is shapesqa.HARD
    shapesqa.write_split(tmp_path, "test", 50, shapesqa.HARD)
    rows = [r for r in shapesqa.read_split(tmp_path, "test") if r["type"] != "describe"]
    dense = shapesqa.score(rows, evaluate.predict(model, processor, rows, tmp_path))
    for kind, floor in {"exist": 0.8, "color": 0.8, "count": 0.4, "position": 0.8}.items():
        assert dense[f"acc_{kind}"] >= floor, (kind, dense)  # chance: 50%, 17%, 11%, 50%


@pytest.mark.slow
def test_gemfilter_on_the_hard_model_finds_the_named_objects(tmp_path):
    """GemFilter keeping 192 of 576 tokens by the answering token's layer-1 attention (what the filter loss
    trained) still answers the questions that hinge on named objects (docs/METHODS.md)."""
    import vtc

    model, processor = reference.load(reference.HARD_WEIGHTS)
    shapesqa.write_split(tmp_path, "test", 100, shapesqa.HARD)
    rows = [r for r in shapesqa.read_split(tmp_path, "test") if r["type"] in ("exist", "color", "position")]
    dense = shapesqa.score(rows, evaluate.predict(model, processor, rows, tmp_path))
    with vtc.apply(model, "gemfilter.r192"):
        pruned = shapesqa.score(rows, evaluate.predict(model, processor, rows, tmp_path))
    for kind in ("exist", "color", "position"):
        assert pruned[f"acc_{kind}"] >= 0.8 * dense[f"acc_{kind}"], (kind, pruned, dense)
