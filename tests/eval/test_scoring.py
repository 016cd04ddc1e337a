"""Scorers against hand-computed cases and the standard definitions' edge cases."""

from __future__ import annotations

import pytest

from vtc.eval import chair, choices
from vtc.eval import scoring as S  # noqa: N812
from vtc.eval.vqa_normalize import normalize_vqa_answer


# -- VQA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period
        ("the Red one", "red 1"),  # article, case
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # a digit comma goes
        ("dont", "don't"),  # contraction table
        ("couldnt've", "couldn't've"),
        ("yes!", "yes"),
        ("(a) cat", "cat"),  # punctuation glued to a word is spaced out, then the article goes
        ("x-ray", "x ray"),  # a dash inside a word becomes a space
        ("", ""),
        ("?", ""),
    ],
)
def test_vqa_normalisation(raw: str, norm: str) -> None:
    assert normalize_vqa_answer(raw) == norm


def test_vqa_accuracy_leave_one_out() -> None:
    answers = ["2"] * 3 + ["two"] * 0 + ["3"] * 7
    # 3 matches: each of the 3 "2" annotators sees 2 others -> 2/3; the 7 others see 3 -> 1. Mean = (3*2/3 + 7)/10
    assert S.vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert S.vqa_accuracy("two", answers) == pytest.approx(0.9)  # VQAv2 maps number words too
    assert S.vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert S.vqa_accuracy("", answers) == 0.0
    assert S.vqa_accuracy("Three.", ["3"] * 10, full_processor=True) == 1.0
    # one matching annotator: 9 others see it once (1/3), itself sees none -> 9/30
    assert S.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="annotators"):
        S.vqa_accuracy("x", [])


def test_textvqa_lowercases_and_drops_question_marks() -> None:
    assert S.vqa_accuracy("STOP?", ["stop"] * 10, full_processor=True) == 1.0


# -- exact match, ScienceQA ------------------------------------------------------------------------
def test_exact_match_ignores_case_and_punctuation() -> None:
    assert S.exact_match("Yes.", "yes") == 1.0
    assert S.exact_match("left side", "left") == 0.0
    assert S.exact_match("", "") == 1.0
    assert S.exact_match("", "no") == 0.0


def test_scienceqa_letters() -> None:
    assert S.scienceqa_match("B", "B") == 1.0
    assert S.scienceqa_match("b", "B") == 1.0
    assert S.scienceqa_match("B. a magnet", "B") == 1.0
    assert S.scienceqa_match("a magnet", "B") == 0.0  # option text instead of the letter: LLaVA counts it wrong
    assert S.scienceqa_match("", "A") == 0.0


# -- POPE ------------------------------------------------------------------------------------------
def test_pope_metrics_hand_computed() -> None:
    preds = ["yes", "yes", "no", "no", "Yes", "yes."]
    gts = ["yes", "no", "yes", "no", "yes", "no"]
    m = S.pope_metrics(preds, gts)
    # lmms parsing: "yes." is neither -> TP 2 (rows 0, 4), FP 1 (row 1), FN 1 (row 2), TN 1 (row 3)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert m["gt_yes_ratio"] == pytest.approx(3 / 6)
    llava = S.pope_metrics(preds, gts, parse="llava")  # "yes." is a yes for LLaVA's parser -> FP 2
    assert llava["precision"] == pytest.approx(2 / 4)
    assert S.pope_parse_llava("No, there is not.") == "no"
    assert S.pope_parse_llava("There is a dog.") == "yes"


def test_pope_empty_denominators_and_bad_answers() -> None:
    m = S.pope_metrics(["no", "no"], ["no", "no"])
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        S.pope_metrics(["yes"], ["maybe"])


# -- MME -------------------------------------------------------------------------------------------
def test_mme_parse() -> None:
    assert S.mme_parse("Yes.") == "yes"
    assert S.mme_parse("N") == "no"
    assert S.mme_parse("No, it is not") == "no"
    assert S.mme_parse("Maybe") == "other"
    assert S.mme_parse("") == "other"


def test_mme_scores_acc_plus() -> None:
    rows = [
        # existence: image a both right (100 + 100), image b one right (50 + 0) -> mean 125
        {"prediction": "Yes", "answer": "Yes", "category": "existence", "image_id": "a"},
        {"prediction": "No", "answer": "No", "category": "existence", "image_id": "a"},
        {"prediction": "Yes", "answer": "Yes", "category": "existence", "image_id": "b"},
        {"prediction": "Yes", "answer": "No", "category": "existence", "image_id": "b"},
        # code_reasoning: one image, both wrong -> 0
        {"prediction": "no", "answer": "Yes", "category": "code_reasoning", "image_id": "c"},
        {"prediction": "", "answer": "No", "category": "code_reasoning", "image_id": "c"},
    ]
    s = S.mme_scores(rows)
    assert s["mme/existence"] == pytest.approx(125.0)
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="pairs"):
        S.mme_scores(rows[:3])


# -- multiple choice -------------------------------------------------------------------------------
def test_mmbench_infer() -> None:
    opts = {"A": "cat", "B": "dog", "C": "red apple"}
    assert choices.mmbench_infer("B", opts) == "B"
    assert choices.mmbench_infer("(C)", opts) == "C"
    assert choices.mmbench_infer("The answer is B.", opts) == "B"
    assert choices.mmbench_infer("a red apple", opts) == "C"  # option text instead of a letter
    assert choices.mmbench_infer("a cat or a dog", opts) is None  # two options named: not inferable
    assert choices.mmbench_infer("", opts) is None


def test_mmbench_circular() -> None:
    base = {"options": {"A": "cat", "B": "dog"}, "category": "x"}
    recs = [
        {**base, "index": 1, "prediction": "A", "answer": "A"},
        {**base, "index": 1_000_001, "prediction": "A", "answer": "B"},  # the shifted variant is wrong
        {**base, "index": 2, "prediction": "B", "answer": "B"},
    ]
    assert S.mmbench_accuracy(recs)["overall"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("(C) a dog", "C"), ("The answer is D.", "D"), ("A.", "A"), ("", ""), ("none of them", "")],
)
def test_extract_choice(text: str, letter: str) -> None:
    assert choices.extract_choice(text, "ABCD") == letter


def test_seed_and_mvbench() -> None:
    assert choices.seed_letter(" C. a car") == "C"
    assert choices.seed_letter("") == ""
    assert S.mvbench_match("(B) running", "B") == 1.0
    assert S.mvbench_match("B. running", "B") == 1.0
    assert S.mvbench_match("running", "B") == 0.0


# -- CHAIR -----------------------------------------------------------------------------------------
def test_chair() -> None:
    descs = ["A red circle and a blue square.", "Two green stars.", "Nothing here."]
    objects = [["red circle", "green square"], ["green star"], ["red cross"]]
    c = chair.chair(descs, objects)
    # mentions: red circle ok, blue square bad, green stars ok -> CHAIR_i 1/3; one of three descriptions bad
    assert c["chair_i"] == pytest.approx(1 / 3)
    assert c["chair_s"] == pytest.approx(1 / 3)
    assert chair.shape_mentions("a Diamond, crosses") == [(None, "diamond"), (None, "cross")]
    assert chair.chair([], []) == {"chair_i": 0.0, "chair_s": 0.0, "mentions": 0.0}


def test_wilson_interval_matches_the_formula_and_stays_in_range() -> None:
    low, high = S.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert S.wilson_interval(0, 10)[0] == 0.0 and S.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert 0.0 < S.wilson_interval(10, 10)[0] < 1.0  # a perfect score still has an interval
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        S.wilson_interval(11, 10)


def test_paired_ratio_interval_is_tight_for_equal_answers_and_wide_for_different() -> None:
    same = [True] * 80 + [False] * 20
    assert S.paired_ratio_interval(same, same) == (1.0, 1.0)
    worse = [True] * 60 + [False] * 40
    low, high = S.paired_ratio_interval(worse, same)
    assert low < 0.75 < high < 1.0  # 0.6 / 0.8, and the interval excludes parity
    assert S.paired_ratio_interval(worse, same) == (low, high)  # seeded
    with pytest.raises(ValueError, match="two equal, non-empty lists"):
        S.paired_ratio_interval(worse, same[:10])
