"""CHAIR for ShapesQA descriptions, and the parser of the shape mentions it counts.

CHAIR_i and CHAIR_s measure object hallucination in a description: the share of mentioned objects that
are not in the image, and the share of descriptions with any such mention. :func:`shape_mentions` is also
how ShapesQA judges a description correct (:func:`vtc.eval.shapesqa.mentioned_objects`), so that one
parser serves both; it is tied to ShapesQA's shapes and colours, hence a module apart from the
benchmark scorers of :mod:`vtc.eval.scoring`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_MENTION = re.compile(rf"\b(?:({'|'.join(COLORS)})\s+)?({'|'.join(SHAPES)})(?:e?s)?\b", re.IGNORECASE)


def shape_mentions(text: str) -> list[tuple[str | None, str]]:
    """Shape instances a description mentions, as (colour or None, shape); plurals count once."""
    return [(c.lower() if c else None, s.lower()) for c, s in _MENTION.findall(text)]


def chair(descriptions: Sequence[str], objects: Sequence[Sequence[str]]) -> dict[str, float]:
    """CHAIR_i and CHAIR_s of descriptions against the objects present ("<color> <shape>" strings).

    A mention is hallucinated when no present object has its shape (and its colour, when one is named).
    CHAIR_i = hallucinated mentions / all mentions; CHAIR_s = descriptions with any hallucinated mention
    / all descriptions. A description that mentions nothing counts as clean.
    """
    if len(descriptions) != len(objects):
        raise ValueError(f"{len(descriptions)} descriptions for {len(objects)} object lists.")
    mentioned = bad = bad_desc = 0
    for text, present in zip(descriptions, objects, strict=True):
        have = [tuple(o.lower().split()[-2:]) if " " in o else (None, o.lower()) for o in present]
        flagged = False
        for color, shape in shape_mentions(text):
            mentioned += 1
            if not any(s == shape and (color is None or c == color) for c, s in have):
                bad += 1
                flagged = True
        bad_desc += flagged
    return {
        "chair_i": bad / mentioned if mentioned else 0.0,
        "chair_s": bad_desc / len(descriptions) if descriptions else 0.0,
        "mentions": float(mentioned),
    }
