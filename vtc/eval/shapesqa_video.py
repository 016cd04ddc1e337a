"""ShapesQA-Video: seeded clips of moving shapes, with questions whose answers follow from the clip.

A clip is :data:`FRAMES` frames of a ShapesQA background (:mod:`vtc.eval.shapesqa`'s textures) on which
one to :data:`MAX_OBJECTS` shapes of distinct colours and distinct shapes appear, each at its own frame,
move in a straight line (left, right, up or down, 24 to 48 pixels while visible) and may disappear
before the end.
Every frame is a ShapesQA :class:`~vtc.eval.shapesqa.Scene`, drawn by ShapesQA's renderer, so both
benchmarks share one look, with a clock on top: a dark bar along the top edge that grows by an eighth of
the width each frame, as a player's progress bar does. Tokens carry no time of their own (the tower sees
one frame at a time, and the language model's positions are relative), so the clock is what lets a tiny
model trained in minutes tell an early frame from a late one. Questions come in four types, each
answered with one word:

- ``order``: "what color is the shape that appears first ?" -> the colour of the shape that enters first
  (entry frames are distinct; colours are distinct in a clip, so the colour names the shape); asked
  about clips of two or more shapes.
- ``direction``: "which way does the red circle move ?" -> left / right / up / down.
- ``count``: "how many shapes appear in the video ?" -> a digit, every shape that is ever visible.
- ``end``: "is the red circle there at the end ?" -> yes / no; always about a shape that does appear,
  so a "no" means it left, and the last frame has to be looked at.

A split on disk is ``<root>/<split>.jsonl`` (``id``, ``video`` relative to ``<root>``, ``question``,
``answer``, ``type``, ``objects``) plus ``<root>/videos/*.mp4``, the layout ``vtc eval`` reads for video
tasks. The videos are lossless H.264 (``libx264rgb``, ``qp=0``, through PyAV), so the frames a reader
decodes are the frames that were drawn: a model trained on rendered frames sees the same pixels at test
time. Training streams clips from :func:`sample_conversation` with seeds disjoint from the held-out
splits' (the split seeds of :mod:`vtc.eval.shapesqa`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vtc.eval import shapesqa

FRAMES = 8
IMAGE_SIZE = shapesqa.IMAGE_SIZE
MAX_OBJECTS = 4
TYPES = ("order", "direction", "count", "end")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MIN_VISIBLE = 4  # frames a shape stays visible, so that its motion shows (at least 3 steps)
TRAVEL = (24.0, 48.0)  # pixels a shape moves while visible (at least a pooled token's width), evenly per frame
SIZE = (16.0, 24.0)  # side of a shape's bounding box, as ShapesQA's
MARGIN = 2.0  # pixels between a shape and the frame's edge (or the clock)
CLOCK = 6  # pixels: the height of the clock, a bar along the top edge that grows by one eighth a frame
CLOCK_COLOR = (20, 20, 20)
GAP = 3.0  # pixels between two shapes' bounding boxes, in every frame both are visible
FPS = 4
SPLIT_SEEDS = shapesqa.SPLIT_SEEDS
TRAIN_SEEDS = shapesqa.TRAIN_SEEDS


@dataclasses.dataclass(frozen=True)
class Track:
    """One shape's life in a clip: where it appears, how it moves, when it is visible."""

    color: str
    shape: str
    size: float
    x: float  # centre at the entry frame, pixels
    y: float
    direction: str  # a key of DIRECTIONS
    speed: float  # pixels a frame
    enter: int  # first visible frame
    leave: int  # last visible frame (inclusive)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def visible(self, t: int) -> bool:
        return self.enter <= t <= self.leave

    def position(self, t: int) -> tuple[float, float]:
        """The centre at frame ``t`` (extrapolated outside the visible frames)."""
        ux, uy = DIRECTIONS[self.direction]
        step = self.speed * (t - self.enter)
        return self.x + ux * step, self.y + uy * step

    def at(self, t: int) -> shapesqa.Shape:
        x, y = self.position(t)
        return shapesqa.Shape(self.color, self.shape, x, y, self.size)


@dataclasses.dataclass(frozen=True)
class Clip:
    """A clip: tracks in order of appearance over one static ShapesQA background."""

    tracks: tuple[Track, ...]
    background: tuple[int, int, int]
    pattern: str
    pattern_seed: int
    frames: int = FRAMES
    size: int = IMAGE_SIZE

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tracks]

    def scene(self, t: int) -> shapesqa.Scene:
        """Frame ``t`` as a ShapesQA scene: the shapes visible then, where they are then."""
        objects = tuple(track.at(t) for track in self.tracks if track.visible(t))
        return shapesqa.Scene(objects, self.background, self.pattern, self.pattern_seed, self.size)

    def first(self) -> Track:
        return min(self.tracks, key=lambda track: track.enter)

    def at_end(self) -> list[Track]:
        return [track for track in self.tracks if track.visible(self.frames - 1)]


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    answer: str
    type: str
    about: str | None = None  # the name of the shape a question asks about, if any


def _inside(track: Track, size: int) -> bool:
    half = track.size / 2 + MARGIN
    for t in (track.enter, track.leave):  # straight lines: the ends are the extremes
        x, y = track.position(t)
        if not (half <= x <= size - half and CLOCK + half <= y <= size - half):
            return False
    return True


def _apart(a: Track, b: Track) -> bool:
    for t in range(max(a.enter, b.enter), min(a.leave, b.leave) + 1):
        (ax, ay), (bx, by) = a.position(t), b.position(t)
        if max(abs(ax - bx), abs(ay - by)) <= (a.size + b.size) / 2 + GAP:
            return False
    return True


def sample_clip(rng: random.Random, frames: int = FRAMES, size: int = IMAGE_SIZE) -> Clip:
    """A clip of 1 to MAX_OBJECTS shapes, distinct in colour and in shape, entering at distinct frames.

    Half the shapes stay to the end; the others disappear after at least MIN_VISIBLE frames. Shapes never
    touch each other or the frame's edge while visible (rejection sampling; a clip that cannot be placed
    is drawn again from the same generator, so the result is still a function of the seed).
    """
    while True:
        n = rng.randint(1, MAX_OBJECTS)
        colors: list[str] = []
        shapes: list[str] = []
        while len(colors) < n:
            color = rng.choices(list(shapesqa.COLORS), shapesqa.COLOR_PRIOR)[0]
            if color not in colors:
                colors.append(color)
        while len(shapes) < n:
            shape = rng.choices(shapesqa.SHAPES, shapesqa.SHAPE_PRIOR)[0]
            if shape not in shapes:
                shapes.append(shape)
        rng.shuffle(colors)  # the first drawn is the likeliest under the prior; it would always enter first
        rng.shuffle(shapes)
        enters = sorted(rng.sample(range(frames - MIN_VISIBLE + 1), n))
        tracks: list[Track] = []
        for color, shape, enter in zip(colors, shapes, enters, strict=True):
            last = frames - 1
            if rng.random() < 0.5 and enter + MIN_VISIBLE - 1 <= frames - 2:
                last = rng.randint(enter + MIN_VISIBLE - 1, frames - 2)
            direction, side = rng.choice(list(DIRECTIONS)), rng.uniform(*SIZE)
            speed = rng.uniform(*TRAVEL) / (last - enter)
            for _ in range(100):
                x, y = rng.uniform(0, size), rng.uniform(0, size)
                track = Track(color, shape, side, x, y, direction, speed, enter, last)
                if _inside(track, size) and all(_apart(track, other) for other in tracks):
                    tracks.append(track)
                    break
            else:
                break  # no room for this one: draw the clip again
        if len(tracks) == n:
            grey = rng.randint(95, 165)
            background = tuple(min(255, max(0, grey + rng.randint(-18, 18))) for _ in range(3))
            pattern = rng.choice(("stripes", "checker", "noise"))
            return Clip(tuple(tracks), background, pattern, rng.getrandbits(31), frames, size)


def clock_length(t: int, frames: int = FRAMES, size: int = IMAGE_SIZE) -> int:
    """Pixels of the clock's bar in frame ``t``: ``size * (t + 1) / frames``, so the last frame's is full."""
    return round(size * (t + 1) / frames)


def render_frame(clip: Clip, t: int) -> np.ndarray:
    """Frame ``t``, ``[H, W, 3]`` uint8 RGB: ShapesQA's renderer for the scene, then the clock on top."""
    image = np.array(shapesqa.render(clip.scene(t)))
    image[:CLOCK, : clock_length(t, clip.frames, clip.size)] = CLOCK_COLOR
    return image


def render(clip: Clip) -> np.ndarray:
    """``[frames, H, W, 3]`` uint8 RGB: every frame of the clip."""
    return np.stack([render_frame(clip, t) for t in range(clip.frames)])


def make_example(clip: Clip, rng: random.Random, kind: str, *, positive: bool = True) -> Example | None:
    """A question of type ``kind`` about ``clip``, or None when the clip cannot pose one.

    ``positive`` picks the answer of an ``end`` question (yes: a shape still there; no: one that left).
    """
    if kind == "order":
        if len(clip.tracks) < 2:
            return None
        return Example("what color is the shape that appears first ?", clip.first().color, "order")
    if kind == "direction":
        track = rng.choice(clip.tracks)
        return Example(f"which way does the {track.name} move ?", track.direction, "direction", track.name)
    if kind == "count":
        return Example("how many shapes appear in the video ?", str(len(clip.tracks)), "count")
    if kind == "end":
        stayed = clip.at_end()
        pool = stayed if positive else [t for t in clip.tracks if t not in stayed]
        if not pool:
            return None
        track = rng.choice(pool)
        return Example(f"is the {track.name} there at the end ?", "yes" if positive else "no", "end", track.name)
    raise ValueError(f"unknown ShapesQA-Video question type {kind!r}; the types are {', '.join(TYPES)}.")


def sample_conversation(seed: int) -> tuple[Clip, list[Example]]:
    """One clip and a question of every type it can pose, in a seeded order (the training stream).

    The order question (when the clip has two or more shapes), the count, the direction of two shapes
    (one when there is one) and whether two shapes are there at the end (one that stayed and, when one
    left, one that left, so that both answers come from the same clip).
    """
    rng = random.Random(seed)
    clip = sample_clip(rng)
    examples = [make_example(clip, rng, "order"), make_example(clip, rng, "count")]
    for track in rng.sample(clip.tracks, min(2, len(clip.tracks))):
        examples.append(Example(f"which way does the {track.name} move ?", track.direction, "direction", track.name))
    examples += [make_example(clip, rng, "end", positive=True), make_example(clip, rng, "end", positive=False)]
    examples = [ex for ex in examples if ex is not None]
    rng.shuffle(examples)
    return clip, examples


def split_rows(split: str, n: int) -> Iterator[tuple[dict, Clip]]:
    """The rows of a held-out split: types in turn, ``end`` answers alternating yes / no."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown ShapesQA-Video split {split!r}; the held-out splits are {', '.join(SPLIT_SEEDS)}.")
    rng = random.Random(SPLIT_SEEDS[split] + 500_000_000)  # apart from ShapesQA's scenes of the same split
    i = 0
    while i < n:
        kind = TYPES[i % len(TYPES)]
        positive = (i // len(TYPES)) % 2 == 0
        clip = sample_clip(rng)
        ex = make_example(clip, rng, kind, positive=positive)
        if ex is None:
            continue  # another clip for the same slot
        row = {
            "id": f"{split}-{i:05d}",
            "video": f"videos/{split}-{i:05d}.mp4",
            "question": ex.question,
            "answer": ex.answer,
            "type": ex.type,
            "objects": clip.names,
        }
        yield row, clip
        i += 1


def write_video(frames: np.ndarray, path: str | Path, fps: int = FPS) -> None:
    """``[F, H, W, 3]`` uint8 frames as a lossless H.264 mp4 (``libx264rgb``, ``qp=0``, one thread).

    Lossless, so that decoding gives back the drawn pixels; one encoder thread and no timestamps in the
    metadata, so that the same frames give the same bytes.
    """
    try:
        import av
    except ImportError as exc:
        raise ImportError("writing ShapesQA-Video clips needs PyAV: pip install 'vtc-vlm[video]'.") from exc
    height, width = frames.shape[1:3]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        stream.thread_count = 1
        stream.options = {"qp": "0", "preset": "medium"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def write_split(root: str | Path, split: str = "test", n: int = 400) -> Path:
    """Write ``n`` rows of a held-out split under ``root``; returns the JSONL path."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    path = root / f"{split}.jsonl"
    with open(path, "w") as f:
        for row, clip in split_rows(split, n):
            write_video(render(clip), root / row["video"])
            f.write(json.dumps(row) + "\n")
    return path


def read_split(root: str | Path, split: str = "test") -> list[dict]:
    """The rows of a split written by :func:`write_split`."""
    return shapesqa.read_rows(root, split, "vtc.eval.shapesqa_video")


def score(rows: list[dict], predictions: list[str]) -> dict[str, float]:
    """Accuracy (exact match after ShapesQA's normalisation) overall and per type (``acc_<type>``)."""
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions; score needs one prediction per row.")
    right: dict[str, list[bool]] = {}
    for row, pred in zip(rows, predictions, strict=True):
        right.setdefault(row["type"], []).append(shapesqa.normalize(pred) == shapesqa.normalize(row["answer"]))
    every = [ok for v in right.values() for ok in v]
    result = {"accuracy": sum(every) / max(len(every), 1), "n": float(len(rows))}
    result.update({f"acc_{t}": sum(v) / len(v) for t, v in sorted(right.items())})
    return result
