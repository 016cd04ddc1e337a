"""ShapesQA: a seeded synthetic visual QA benchmark whose answers are exact.

Scenes are coloured shapes on textured backgrounds, small enough (96 x 96 by default, a 12 x 12 grid of
8-pixel patches) that where things are matters to the visual tokens. Questions come in five types:

- ``exist``: "is there a red circle in the image ?" -> yes / no. The negatives follow POPE's three
  subsets: ``random`` (any absent object), ``popular`` (the most frequent absent objects; shapes and
  colours are drawn with a skewed prior so that frequency means something) and ``adversarial`` (absent
  objects that share the shape or the colour of one in the scene, the closest confusions).
- ``color``: "what color is the star ?" (asked only about a shape that occurs once).
- ``count``: "how many shapes are there ?" -> a digit.
- ``position``: "is the red circle left or right of the blue square ?" -> left / right (or above / below),
  asked only about pairs at least ``MIN_GAP`` pixels apart on that axis.
- ``describe``: "describe the image ." -> "a red circle and a blue square", objects left to right; scored
  CHAIR-style (objects mentioned that the scene lacks).

A split on disk is ``<root>/<split>.jsonl`` (one JSON object per row: ``id``, ``image`` relative to
``<root>``, ``question``, ``answer``, ``type``, ``pope``, ``objects``) plus ``<root>/images/*.png``, the
layout the eval harness reads. Training streams examples from :func:`sample_example` (one question) or
:func:`sample_conversation` (every kind of question about one scene) instead, with seeds
disjoint from the held-out splits'. A video variant can reuse :class:`Scene` with per-frame positions
(moving shapes: order of appearance, direction of motion).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 30),
    "purple": (150, 50, 190),
    "white": (250, 250, 250),
}
# Skewed priors, so that POPE's "popular" negatives (the most frequent objects) differ from random ones.
SHAPE_PRIOR = (0.28, 0.22, 0.16, 0.13, 0.11, 0.10)
COLOR_PRIOR = (0.27, 0.21, 0.17, 0.14, 0.11, 0.10)
TYPES = ("exist", "color", "count", "position", "describe")
QUESTION_TYPES = TYPES[:4]  # answered with a word; "describe" asks for a description
POPE_SUBSETS = ("random", "popular", "adversarial")
IMAGE_SIZE = 96
MAX_OBJECTS = 4
MIN_GAP = 12  # pixels between the centres of two objects compared in a position question
# Held-out splits draw scenes from their own seed ranges; training streams from seeds below TRAIN_SEEDS.
SPLIT_SEEDS = {"val": 1_000_000_000, "test": 2_000_000_000}
TRAIN_SEEDS = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class Variant:
    """A geometry of the benchmark: image side, how many objects a scene holds and how large they are.

    Questions, answers and scoring are the same in every variant; only the scenes differ.
    """

    name: str
    size: int  # image side, pixels
    max_objects: int  # scenes hold 1 to this many objects (the count answers)
    min_side: float  # object bounding-box side, pixels
    max_side: float


#: ShapesQA: 96 px scenes of 1 to 4 objects (a 12 x 12 grid of 8-px patches).
STANDARD = Variant("shapesqa", IMAGE_SIZE, MAX_OBJECTS, 16, 24)
#: ShapesQA-hard, at LLaVA-1.5's geometry: 192 px scenes (24 x 24 patches, 576 visual tokens) of 1 to 9 objects,
#: smaller relative to the image, so that counts run to 9 and relations are asked among many objects.
HARD = Variant("shapesqa_hard", 2 * IMAGE_SIZE, 9, 14, 22)
VARIANTS = {v.name: v for v in (STANDARD, HARD)}


def variant(name: str | Variant) -> Variant:
    """The variant called `name` (a Variant passes through); ValueError naming the variants otherwise."""
    if isinstance(name, Variant):
        return name
    if name not in VARIANTS:
        raise ValueError(f"unknown ShapesQA variant {name!r}; the variants are {', '.join(VARIANTS)}.")
    return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    x: float  # centre, pixels
    y: float
    size: float  # side of the bounding box, pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: tuple[int, int, int]
    pattern: str  # "stripes", "checker" or "noise"
    pattern_seed: int
    size: int = IMAGE_SIZE

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    answer: str
    type: str
    pope: str | None = None


def popular_order() -> list[str]:
    """Every object name, most frequent first under the priors (ties by name)."""
    pairs = [
        (cp * sp, f"{c} {s}")
        for c, cp in zip(COLORS, COLOR_PRIOR, strict=True)
        for s, sp in zip(SHAPES, SHAPE_PRIOR, strict=True)
    ]
    return [name for _, name in sorted(pairs, key=lambda t: (-t[0], t[1]))]


_POPULAR = popular_order()


def sample_scene(rng: random.Random, geometry: Variant = STANDARD) -> Scene:
    """A scene of 1 to ``geometry.max_objects`` distinct objects that do not overlap."""
    size = geometry.size
    n = rng.randint(1, geometry.max_objects)
    names: list[tuple[str, str]] = []
    while len(names) < n:
        pair = (rng.choices(list(COLORS), COLOR_PRIOR)[0], rng.choices(SHAPES, SHAPE_PRIOR)[0])
        if pair not in names:
            names.append(pair)
    objects: list[Shape] = []
    for color, shape in names:
        for _ in range(200):  # rejection sampling; both variants' objects always fit (2 % of the area each)
            s = rng.uniform(geometry.min_side, geometry.max_side)
            x, y = rng.uniform(s / 2 + 2, size - s / 2 - 2), rng.uniform(s / 2 + 2, size - s / 2 - 2)
            if all(max(abs(x - o.x), abs(y - o.y)) > (s + o.size) / 2 + 3 for o in objects):
                objects.append(Shape(color, shape, x, y, s))
                break
    grey = rng.randint(95, 165)
    background = tuple(min(255, max(0, grey + rng.randint(-18, 18))) for _ in range(3))
    return Scene(tuple(objects), background, rng.choice(("stripes", "checker", "noise")), rng.getrandbits(31), size)


def _texture(scene: Scene) -> np.ndarray:
    """The background: a muted colour with a low-contrast pattern, [H, W, 3] uint8."""
    rng = np.random.default_rng(scene.pattern_seed)
    n = scene.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    if scene.pattern == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(5, 14)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif scene.pattern == "checker":
        cell = int(rng.integers(4, 12))
        wave = ((xx // cell + yy // cell) % 2) * 2 - 1.0
    else:
        wave = rng.standard_normal((n, n)).astype(np.float32)
    amplitude = rng.uniform(8, 20)
    image = np.asarray(scene.background, np.float32)[None, None] + amplitude * wave[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def _outline(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]]:
    h = s / 2
    if shape == "square":
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "diamond":
        return [(x, y - h), (x + h, y), (x, y + h), (x - h, y)]
    if shape == "star":
        return [
            (x + (h if k % 2 == 0 else h * 0.45) * math.sin(k * math.pi / 5),
             y - (h if k % 2 == 0 else h * 0.45) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    if shape == "cross":
        a = h / 3
        return [
            (x - a, y - h), (x + a, y - h), (x + a, y - a), (x + h, y - a), (x + h, y + a), (x + a, y + a),
            (x + a, y + h), (x - a, y + h), (x - a, y + a), (x - h, y + a), (x - h, y - a), (x - a, y - a),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; ShapesQA draws {', '.join(SHAPES)}.")


def _draw(image: Image.Image, scene: Scene, fills: list) -> Image.Image:
    draw = ImageDraw.Draw(image)
    for o, fill in zip(scene.objects, fills, strict=True):
        if o.shape == "circle":
            draw.ellipse([o.x - o.size / 2, o.y - o.size / 2, o.x + o.size / 2, o.y + o.size / 2], fill=fill)
        else:
            draw.polygon(_outline(o.shape, o.x, o.y, o.size), fill=fill)
    return image


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image."""
    return _draw(Image.fromarray(_texture(scene)), scene, [COLORS[o.color] for o in scene.objects])


def object_map(scene: Scene) -> np.ndarray:
    """``[H, W]`` uint8: 1 + the index of the object drawn at each pixel, 0 for the background."""
    image = Image.new("L", (scene.size, scene.size), 0)
    return np.asarray(_draw(image, scene, list(range(1, len(scene.objects) + 1))))


def describe(scene: Scene) -> str:
    """The reference description: every object, left to right."""
    objects = sorted(scene.objects, key=lambda o: o.x)
    return " and ".join(f"a {o.name}" for o in objects)


def _shares_attribute(a: str, b: str) -> bool:
    (color_a, shape_a), (color_b, shape_b) = a.split(), b.split()
    return color_a == color_b or shape_a == shape_b


def _exist(scene: Scene, rng: random.Random, positive: bool, subset: str) -> Example:
    present = set(scene.names)
    if positive:
        name = rng.choice(scene.names)
    else:
        absent = [n for n in _POPULAR if n not in present]
        if subset == "popular":
            name = absent[0]
        elif subset == "adversarial":  # shares the shape or the colour of something in the scene
            near = [n for n in absent if any(_shares_attribute(n, p) for p in present)]
            name = rng.choice(near)
        else:
            name = rng.choice(absent)
    return Example(f"is there a {name} in the image ?", "yes" if positive else "no", "exist", subset)


def _color(scene: Scene, rng: random.Random) -> Example | None:
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return Example(f"what color is the {o.shape} ?", o.color, "color")


def _position(scene: Scene, rng: random.Random) -> Example | None:
    pairs = []
    for a in scene.objects:
        for b in scene.objects:
            if a is not b and abs(a.x - b.x) >= MIN_GAP:
                pairs.append((a, b, "x"))
            if a is not b and abs(a.y - b.y) >= MIN_GAP:
                pairs.append((a, b, "y"))
    if not pairs:
        return None
    a, b, axis = rng.choice(pairs)
    if axis == "x":
        return Example(f"is the {a.name} left or right of the {b.name} ?", "left" if a.x < b.x else "right", "position")
    return Example(f"is the {a.name} above or below the {b.name} ?", "above" if a.y < b.y else "below", "position")


def make_example(
    scene: Scene, rng: random.Random, kind: str, *, positive: bool = True, subset: str = "random"
) -> Example | None:
    """A question of type ``kind`` about ``scene``, or None when the scene cannot pose one."""
    if kind == "exist":
        return _exist(scene, rng, positive, subset)
    if kind == "color":
        return _color(scene, rng)
    if kind == "count":
        return Example("how many shapes are there ?", str(len(scene.objects)), "count")
    if kind == "position":
        return _position(scene, rng)
    if kind == "describe":
        return Example("describe the image .", describe(scene), "describe")
    raise ValueError(f"unknown ShapesQA question type {kind!r}; the types are {', '.join(TYPES)}.")


def sample_example(seed: int, kind: str | None = None, geometry: Variant = STANDARD) -> tuple[Scene, Example]:
    """One scene and one question, both determined by ``seed`` (the training stream)."""
    rng = random.Random(seed)
    while True:
        scene = sample_scene(rng, geometry)
        t = kind or rng.choice(TYPES)
        ex = make_example(scene, rng, t, positive=rng.random() < 0.5, subset=rng.choice(POPE_SUBSETS))
        if ex is not None:
            return scene, ex


def sample_conversation(seed: int, geometry: Variant = STANDARD) -> tuple[Scene, list[Example]]:
    """One scene and every kind of question about it, in a seeded order (the multi-turn training stream).

    Two existence questions, one true and one false (a contrastive pair on the same image, so that the
    answer must come from binding the colour to the shape), a colour, a count, two position questions
    (when the scene can pose them) in a random order, then a description (last, so that no answer can be
    copied from it).
    """
    rng = random.Random(seed)
    scene = sample_scene(rng, geometry)
    kinds = [("exist", True), ("exist", False), ("color", True), ("count", True), ("position", True)]
    kinds += [("position", True)]
    examples = [make_example(scene, rng, k, positive=pos, subset=rng.choice(POPE_SUBSETS)) for k, pos in kinds]
    examples = [ex for ex in examples if ex is not None]
    rng.shuffle(examples)
    return scene, [*examples, make_example(scene, rng, "describe")]


def split_rows(split: str, n: int, geometry: Variant = STANDARD) -> Iterator[tuple[dict, Scene]]:
    """The rows of a held-out split: types in turn, POPE subsets in turn, yes and no balanced in each.

    A variant's splits draw from the same seeds as ShapesQA's; its scenes differ because its geometry does.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown ShapesQA split {split!r}; the held-out splits are {', '.join(SPLIT_SEEDS)}.")
    rng = random.Random(SPLIT_SEEDS[split])
    i = 0
    while i < n:
        kind = TYPES[i % len(TYPES)]
        k = i // len(TYPES)  # how many of this type came before
        subset = POPE_SUBSETS[k % 3]
        positive = (k // 3) % 2 == 0
        scene = sample_scene(rng, geometry)
        ex = make_example(scene, rng, kind, positive=positive, subset=subset)
        if ex is None:
            continue  # another scene for the same slot
        row = {
            "id": f"{split}-{i:05d}",
            "image": f"images/{split}-{i:05d}.png",
            "question": ex.question,
            "answer": ex.answer,
            "type": ex.type,
            "pope": ex.pope if kind == "exist" else None,
            "objects": scene.names,
        }
        yield row, scene
        i += 1


def write_split(root: str | Path, split: str = "test", n: int = 500, geometry: str | Variant = STANDARD) -> Path:
    """Write ``n`` rows of a held-out split (of `geometry`, ShapesQA by default) under ``root``; the JSONL path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / f"{split}.jsonl"
    with open(path, "w") as f:
        for row, scene in split_rows(split, n, variant(geometry)):
            render(scene).save(root / row["image"])
            f.write(json.dumps(row) + "\n")
    return path


def read_split(root: str | Path, split: str = "test") -> list[dict]:
    """The rows of a split written by :func:`write_split`."""
    return read_rows(root, split, "vtc.eval.shapesqa")


def read_rows(root: str | Path, split: str, module: str) -> list[dict]:
    """The rows of ``<root>/<split>.jsonl``, a split that `module`'s ``write_split`` writes."""
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with {module}.write_split({str(root)!r}, {split!r}).")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: how answers are compared."""
    kept = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(kept.split())


def mentioned_objects(text: str) -> list[str]:
    """The objects a description names, as ``"<color> <shape>"`` (``"? <shape>"`` without a colour).

    The same mentions CHAIR counts (:func:`vtc.eval.chair.shape_mentions`), so a description is judged
    correct and scored for hallucination by one parser.
    """
    from vtc.eval.chair import shape_mentions

    return [f"{color or '?'} {shape}" for color, shape in shape_mentions(text)]


def is_correct(row: dict, prediction: str) -> bool:
    """Exact match after normalisation; a description is correct when it names exactly the scene's objects."""
    if row["type"] == "describe":
        return sorted(mentioned_objects(prediction)) == sorted(row["objects"])
    return normalize(prediction) == normalize(row["answer"])


def score(rows: list[dict], predictions: list[str]) -> dict[str, float]:
    """ShapesQA's metrics: accuracy, per type, POPE over ``exist``, CHAIR over ``describe``.

    ``accuracy`` is over the questions (``QUESTION_TYPES``); descriptions are a generation task, scored by
    ``acc_describe`` (exactly the scene's objects named) and CHAIR.

    ``pope_*`` are :func:`vtc.eval.scoring.pope_metrics` of the ``exist`` rows (lower-cased exact yes / no);
    ``chair_i`` / ``chair_s`` are :func:`vtc.eval.chair.chair` of the descriptions.
    """
    from vtc.eval import chair, scoring

    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions; score needs one prediction per row.")
    right: dict[str, list[bool]] = {}
    for row, pred in zip(rows, predictions, strict=True):
        right.setdefault(row["type"], []).append(is_correct(row, pred))
    answered = [ok for t, v in right.items() if t in QUESTION_TYPES for ok in v]
    result = {"accuracy": sum(answered) / max(len(answered), 1), "n": float(len(rows))}
    result.update({f"acc_{t}": sum(v) / len(v) for t, v in sorted(right.items())})
    exist = [(p, r["answer"]) for r, p in zip(rows, predictions, strict=True) if r["type"] == "exist"]
    if exist:
        pope = scoring.pope_metrics([normalize(p) for p, _ in exist], [a for _, a in exist])
        result.update(
            {f"pope_{k}": v for k, v in pope.items() if k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        )
    described = [(p, r["objects"]) for r, p in zip(rows, predictions, strict=True) if r["type"] == "describe"]
    if described:
        hallucination = chair.chair([p for p, _ in described], [o for _, o in described])
        result.update(chair_i=hallucination["chair_i"], chair_s=hallucination["chair_s"])
    return result
