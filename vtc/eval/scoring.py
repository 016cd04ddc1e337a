"""Scorers with the standard definitions, so vtc's numbers compare with the papers' and lmms-eval's.

Every function here reproduces a published definition, quirks included, because a "fixed" scorer
gives numbers that no longer compare:

* VQA accuracy (VQAv2, TextVQA): the official VQA normalisation (punctuation, number words, articles,
  contractions; :mod:`vtc.eval.vqa_normalize`) and the leave-one-annotator-out average of
  ``min(1, matches / 3)``. VQAv2 normalises as lmms-eval's ``vqav2`` task does (punctuation and
  digits/articles only), TextVQA as its ``textvqa`` task does (the full EvalAI processor, which also
  lower-cases and drops commas and question marks).
* GQA, ScienceQA: exact match ignoring case and punctuation (lmms-eval's ``exact_match``), and for
  ScienceQA LLaVA's rule that "B. text" counts as "B".
* POPE: accuracy, precision, recall and F1 of "yes" as the positive class. ``yes_ratio`` is the share
  of *predictions* that are "yes" (the POPE paper's figure); lmms-eval reports the share of *ground
  truth* "yes" under that name, kept here as ``gt_yes_ratio``.
* MME: per category the mean over images of acc + acc+ (both questions of an image right), x100,
  summed over the perception and the cognition categories.
* Multiple choice: MMBench's circular evaluation and MVBench's rule, over the letters that
  :mod:`vtc.eval.choices` reads from the answers (MMBench's own ``can_infer``, SEED's first character,
  Video-MME's ranked letter extraction).

CHAIR over ShapesQA's descriptions is in :mod:`vtc.eval.chair`.
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from vtc.eval.choices import extract_choice, mmbench_infer, mvbench_letter
from vtc.eval.vqa_normalize import normalize_vqa_answer, vqa_digits_articles, vqa_punctuation


# -- VQA accuracy ----------------------------------------------------------------------------------
def vqa_accuracy(prediction: str, answers: Sequence[str], *, full_processor: bool = False) -> float:
    """VQA accuracy of one prediction against the annotators' answers (10 for VQAv2 and TextVQA).

    For each annotator, ``min(1, matches among the other annotators / 3)``; the mean over annotators.

    Args:
        prediction: the model's answer.
        answers: the human answers (repeats included; they count).
        full_processor: True for TextVQA (the whole EvalAI processor on both sides); False for VQAv2
            (whitespace, punctuation, digits and articles only), as lmms-eval scores them.
    """
    if not answers:
        raise ValueError("VQA accuracy needs the annotators' answers; this question has none.")
    if full_processor:
        pred = normalize_vqa_answer(prediction)
        gts = [normalize_vqa_answer(a) for a in answers]
    else:
        clean = lambda s: vqa_digits_articles(vqa_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))  # noqa: E731
        pred, gts = clean(prediction), [clean(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# -- exact match ------------------------------------------------------------------------------------
_NO_PUNCT = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, target: str) -> float:
    """lmms-eval's ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (GQA, ScienceQA)."""
    return float(prediction.lower().translate(_NO_PUNCT) == target.lower().translate(_NO_PUNCT))


def scienceqa_match(prediction: str, letter: str) -> float:
    """LLaVA's ScienceQA rule: the letter alone, or an upper-case "X." prefix ("B. a magnet")."""
    pred, target = prediction.strip(), letter.strip().lower()
    if pred.lower() == target:
        return 1.0
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return float(pred[0].lower() == target)
    return 0.0


# -- POPE ---------------------------------------------------------------------------------------------
def pope_parse_llava(prediction: str) -> str:
    """LLaVA's official POPE parser: the first sentence; "no" or "not" anywhere in it means no."""
    first = prediction.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def pope_metrics(predictions: Sequence[str], answers: Sequence[str], *, parse: str = "lmms") -> dict[str, float]:
    """POPE metrics, "yes" being the positive class.

    Args:
        predictions: model answers.
        answers: "yes" / "no" ground truth.
        parse: ``"lmms"`` (lower-case exact match, lmms-eval; "Yes." is neither yes nor no) or
            ``"llava"`` (the official parser: anything without "no"/"not" is yes).

    Returns:
        accuracy, precision, recall, f1, yes_ratio (of predictions), gt_yes_ratio (lmms-eval's
        ``pope_yes_ratio``) and n. Empty denominators give 0, as in lmms-eval.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers.")
    if parse not in ("lmms", "llava"):
        raise ValueError(f"parse must be 'lmms' or 'llava'; got {parse!r}.")
    tp = fp = fn = correct = yes = gt_yes = 0
    for raw, gt in zip(predictions, answers, strict=True):
        gt = gt.lower().strip()
        if gt not in ("yes", "no"):
            raise ValueError(f"POPE answers are 'yes' or 'no'; got {gt!r}.")
        pred = raw.lower().strip() if parse == "lmms" else pope_parse_llava(raw)
        correct += pred == gt
        yes += pred == "yes"
        gt_yes += gt == "yes"
        tp += gt == "yes" and pred == "yes"
        fp += gt == "no" and pred == "yes"
        fn += gt == "yes" and pred == "no"
    n = len(answers)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": yes / n if n else 0.0,
        "gt_yes_ratio": gt_yes / n if n else 0.0,
        "n": float(n),
    }


# -- MME ----------------------------------------------------------------------------------------------
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(prediction: str) -> str:
    """MME's (Otter's) yes/no parser: "yes"/"no", "y"/"n", else "yes" or "no" within the first 4 characters."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Iterable[Mapping[str, str]]) -> dict[str, float]:
    """MME scores from records with ``prediction``, ``answer``, ``category`` and ``image_id``.

    Per category: mean over images of (acc + acc+) x 100, where acc is the share of the image's two
    questions answered right and acc+ is 1 when both are. ``perception`` and ``cognition`` sum their
    categories (maximum 2000 and 800).

    Raises:
        ValueError: an image does not have exactly two questions (MME is pairwise).
    """
    per_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        gt = r["answer"].lower().strip().replace(".", "")
        if gt not in ("yes", "no"):
            raise ValueError(f"MME answers are 'yes' or 'no'; got {r['answer']!r}.")
        per_cat[r["category"]][r["image_id"]].append(float(mme_parse(r["prediction"]) == gt))
    out: dict[str, float] = {}
    for cat, images in per_cat.items():
        total = 0.0
        for image, scores in images.items():
            if len(scores) != 2:
                raise ValueError(f"MME scores questions in pairs; image {image!r} of {cat!r} has {len(scores)}.")
            total += sum(scores) / 2 * 100.0 + (sum(scores) == 2) * 100.0
        out[f"mme/{cat}"] = total / len(images)
    out["perception"] = sum(v for k, v in out.items() if k[4:] in MME_PERCEPTION)
    out["cognition"] = sum(v for k, v in out.items() if k[4:] in MME_COGNITION)
    return out


# -- multiple choice ----------------------------------------------------------------------------------
def mmbench_accuracy(records: Iterable[Mapping]) -> dict[str, float]:
    """MMBench accuracy with circular evaluation, scored offline.

    Records carry ``index``, ``prediction``, ``answer`` (a letter), ``options`` (letter -> text) and
    ``category``. Rows whose ``index`` agree modulo 10**6 are the circular variants of one question
    (the dev split shifts the options); the question counts only when every variant is right. Each
    answer is read with ``mmbench_infer``, then ``extract_choice`` (lmms-eval's ``static`` mode, where
    the GPT judge is not called).
    """
    groups: dict[int, list[Mapping]] = defaultdict(list)
    for r in records:
        groups[int(r["index"]) % 10**6].append(r)
    hits: dict[str, list[float]] = defaultdict(list)
    for _, rows in sorted(groups.items()):
        ok = True
        for r in rows:
            pred = mmbench_infer(r["prediction"], dict(r["options"]))
            if not pred:
                pred = extract_choice(r["prediction"], sorted(r["options"]))
            ok = ok and pred == r["answer"]
        main = min(rows, key=lambda r: int(r["index"]))
        hits["overall"].append(float(ok))
        hits[f"mmbench/{main.get('category', '')}"].append(float(ok))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def mvbench_match(prediction: str, letter: str) -> float:
    """MVBench score of one answer against the correct letter."""
    return float(mvbench_letter(prediction) == mvbench_letter(letter))


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z = 1.96): right at 0% and 100%, unlike the normal
    approximation, which is what small benchmarks need."""
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"wilson_interval needs 0 <= correct <= total and total > 0; got {correct} of {total}.")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * (p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5 / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_ratio_interval(
    right: Sequence[bool], base: Sequence[bool], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile-bootstrap interval of ``mean(right) / mean(base)`` over the same questions.

    The questions are resampled together (paired), so the interval reflects how two methods differ on the
    same questions, not the spread of either alone; seeded, so a table reproduces.
    """
    import random

    if len(right) != len(base) or not right:
        raise ValueError(f"paired_ratio_interval needs two equal, non-empty lists; got {len(right)} and {len(base)}.")
    rng = random.Random(seed)
    n, ratios = len(right), []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        b = sum(base[i] for i in picks)
        ratios.append(sum(right[i] for i in picks) / b if b else float("inf"))
    ratios.sort()
    low = ratios[int((1 - level) / 2 * resamples)]
    high = ratios[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high
