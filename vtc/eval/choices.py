"""Reading the chosen option out of a free-form answer, as each multiple-choice benchmark's own code does.

MMBench's ``can_infer`` (a lone option letter, then the text of exactly one option), lmms-eval's ranked
letter extraction (Video-MME, MMBench's offline fallback), SEED's first character and MVBench's reading
of a letter. These turn an answer into a letter; :mod:`vtc.eval.scoring` compares the letters with the
answer key (circular evaluation, per-category means), so the parsers are kept apart from the scores.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

from vtc.eval.vqa_normalize import vqa_punctuation


def mmbench_infer_option(prediction: str, num_choices: int = 5) -> str | None:
    """MMBench's ``can_infer_option``: a lone option letter among the words, bare or with punctuation."""
    letters = string.ascii_uppercase[:num_choices]
    words = [w.strip() for w in prediction.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(1 for c in letters if prefix + c + suffix in words)

    # A lone "A" in a longer answer may be the article; MMBench then ignores bare letters.
    if count() == 1 and not ("A" in words and len(words) > 3):
        for c in letters:
            if c in words:
                return c
    for pre, suf in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                     (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")):  # fmt: skip
        if count(pre, suf) == 1:
            for c in letters:
                if pre + c + suf in words:
                    return c
    return None


def mmbench_infer_text(prediction: str, options: Mapping[str, str]) -> str | None:
    """MMBench's ``can_infer_text``: the one option whose text occurs in the (lower-cased) answer."""
    text = prediction.lower()
    hits = [k for k, v in options.items() if str(v).lower() in text]
    return hits[0] if len(hits) == 1 else None


def mmbench_infer(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option MMBench reads from an answer: a letter first, else the text of exactly one option."""
    return mmbench_infer_option(prediction) or mmbench_infer_text(prediction, options)


_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "答案是", "答案为", "选", "答えは", "옵션", "정답은", "답은", "답:",
)  # fmt: skip
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "paren": 6, "period": 5, "colon": 4, "rparen": 3, "space": 2}


def extract_choice(prediction: str, letters: Sequence[str] = "ABCDEFGH") -> str:
    """lmms-eval's ranked letter extraction (Video-MME, MMBench's offline fallback); "" when none.

    Candidates in several formats ("(B)", "B.", "B:", "B)", "B ", "the answer is B", a leading or
    trailing lone letter) are ranked by format and, within a format, by the later position.
    """
    if not prediction or not prediction.strip():
        return ""
    text = prediction.strip()
    for ch in ",.!?;:'\"":
        text = text.strip(ch)
    text = f" {text} "
    cands: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for fmt, pattern in (("paren", "({})"), ("period", "{}."), ("colon", "{}:"), ("rparen", "{})"), ("space", "{} ")):
        for c in letters:
            if pattern.format(c) in text:
                cands.append((_MCQ_PRIORITY[fmt], text.rfind(pattern.format(c)), c))
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for c in letters:
                pos = text.find(c, at + len(phrase))
                if pos != -1:
                    cands.append((_MCQ_PRIORITY["phrase"], pos, c))
    core = text.strip()
    for c in letters:
        if core.startswith(c) and (len(core) == 1 or not core[1].isalpha()):
            cands.append((_MCQ_PRIORITY["start"], 0, c))
        if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha()):
            cands.append((_MCQ_PRIORITY["end"], len(text) - 1, c))
    if not cands:
        cands = [(0, text.rfind(c), c) for c in letters if c in text]
    return max(cands)[2] if cands else ""


def seed_letter(prediction: str) -> str:
    """SEED-Bench (lmms-eval): the first character of the stripped answer."""
    pred = prediction.strip()
    return pred[0] if pred else ""


def mvbench_letter(text: str) -> str:
    """MVBench's reading of an answer: "B. ..." -> "B", else a standalone A-E letter, else the cleaned text."""
    m = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.IGNORECASE)
    if m:
        return m.group(1).upper()
    text = vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = re.search(r"\b([A-E])\b", text, re.IGNORECASE)
    return m.group(1).upper() if m else text
