"""The official VQA answer normalisation, shared by the VQA scorers and MVBench's reading of a letter.

The VQA evaluation's ``processPunctuation`` and ``processDigitArticle`` (number words, articles,
contractions) and the EvalAI answer processor built from them, reproduced quirks included so that scores
compare with the papers' and lmms-eval's. They live apart from :mod:`vtc.eval.scoring` because both the
VQA accuracy there and the option extraction in :mod:`vtc.eval.choices` read answers through them.
"""

from __future__ import annotations

import re

# The official VQA evaluation maps contractions written without (some of) their apostrophes back to
# the canonical form. Its table follows one rule, generated below: a one-apostrophe contraction is also
# written without it ("dont"), a two-apostrophe one with either apostrophe missing ("couldnt've").
_CANONICAL_CONTRACTIONS = tuple(
    " ".join(
        (
            "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't",
            "haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am",
            "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't",
            "she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd",
            "someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've",
            "there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't",
            "what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've",
            "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've",
            "you'll you're you've",
        )
    ).split()
)


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for canon in _CANONICAL_CONTRACTIONS:
        marks = [i for i, c in enumerate(canon) if c == "'"]
        if len(marks) == 1:
            table[canon.replace("'", "")] = canon
        else:
            for i in marks:
                table[canon[:i] + canon[i + 1 :]] = canon
    table["somebody'd"] = "somebodyd"  # sic: an entry of the official table, kept so scores match
    return table


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# The official pattern reads "(?!<=\d)" (a typo for a look-behind); as written it only requires that
# the period is not followed by a digit. Kept verbatim in meaning.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The official code passes re.UNICODE (= 32) as the *count* of period replacements; so do we.
_PERIOD_COUNT = int(re.UNICODE)


def vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation``: drop or space out punctuation, strip periods not before a digit."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCTUATION:
        glued = not (p + " " in text or " " + p in text or digit_comma)
        out = out.replace(p, " " if glued else "")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def vqa_digits_articles(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The full EvalAI answer processor (lmms-eval's ``EvalAIAnswerProcessor()(text)``)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))
