"""Supervision targets for the video reference model, read off a clip's tracks and its tokenised conversation.

Answers alone are a thin signal for a tiny model that has to find motion and order across 129 visual
tokens. Training therefore also supervises what the tower sees in each patch of a frame
(:func:`frame_targets`: colour, shape, where that shape is, the clock), what each visual token stands
for (:func:`cell_targets`: the shape covering its pooled cell, where it is, which way it moves), the
clip's count at the newline that closes the video (:func:`newline_targets`), the answer at the shape
word a question names (:func:`name_positions`), and where one attention head of three layers looks
(:func:`attention_targets`). Probes read these from the hidden states and are dropped after training;
the saved model is a stock LLaVA-OneVision.
"""

from __future__ import annotations

import torch

from vtc.eval import shapesqa, shapesqa_video
from vtc.reference.targets import coverage, patch_targets

IGNORE = -100
COVER = 0.15  # a pooled cell belongs to the shape covering the most of it, if at least this share
MOVED = 12.0  # pixels a shape must have moved since its entry before its tokens are asked its direction


def frame_targets(clip: shapesqa_video.Clip, t: int, patch: int) -> dict[str, torch.Tensor]:
    """The tower's per-patch targets for frame ``t`` (patches in raster order).

    ``classes``: ``[2, P]`` :func:`patch_targets` (1 + colour, 1 + shape of the shape covering a quarter
    of the patch or more, 0 for none); ``centre``: ``[P, 2]`` that shape's centre over the frame size
    (NaN where none); ``clock``: ``[P]`` the share of the patch the clock's bar covers.
    """
    scene = clip.scene(t)
    g = clip.size // patch
    centre = torch.full((g * g, 2), float("nan"))
    if scene.objects:
        classes = patch_targets(scene, patch)
        cover = coverage(scene, patch)  # [objects, P]
        best, owner = cover.max(dim=0)
        centres = torch.tensor([(o.x, o.y) for o in scene.objects]) / clip.size
        centre[best >= 0.25] = centres[owner[best >= 0.25]]
    else:
        classes = torch.zeros(2, g * g, dtype=torch.long)
    bar = torch.zeros(clip.size, clip.size)
    bar[: shapesqa_video.CLOCK, : shapesqa_video.clock_length(t, clip.frames, clip.size)] = 1.0
    clock = bar.reshape(g, patch, g, patch).mean(dim=(1, 3)).flatten()
    return {"classes": classes, "centre": centre, "clock": clock}


def cell_owners(clip: shapesqa_video.Clip, cell: int) -> torch.Tensor:
    """``[frames, cells]``: the index (in ``clip.tracks``) of the track covering each cell most, or -1.

    ``cell`` is the side of a pooled cell in pixels (the patch times two); cells are in raster order,
    the order OneVision lays a frame's pooled tokens in.
    """
    grid = clip.size // cell
    owners = torch.full((clip.frames, grid * grid), -1, dtype=torch.long)
    for t in range(clip.frames):
        visible = [k for k, track in enumerate(clip.tracks) if track.visible(t)]
        if not visible:
            continue
        cover = coverage(clip.scene(t), cell)  # [visible, cells]
        best, at = cover.max(dim=0)
        owners[t] = torch.where(best >= COVER, torch.tensor(visible)[at], -1)
    return owners


def cell_targets(clip: shapesqa_video.Clip, cell: int) -> dict[str, torch.Tensor]:
    """Targets for each visual token of a frame's cells, flattened over frames (``[frames * cells]``).

    ``color`` / ``shape``: the owner's, as indices into COLORS / SHAPES (IGNORE on background);
    ``centre``: the owner's centre at that frame over the frame size (``[N, 2]``, x then y; NaN on
    background); ``direction``: the owner's direction (index into DIRECTIONS), IGNORE on background and
    until the owner has moved MOVED pixels from where it entered (too little motion to show).
    """
    owners = cell_owners(clip, cell)  # [F, C]
    frames = torch.arange(clip.frames)[:, None].expand_as(owners)
    columns = {
        "color": [list(shapesqa.COLORS).index(t.color) for t in clip.tracks],
        "shape": [shapesqa.SHAPES.index(t.shape) for t in clip.tracks],
        "direction": [list(shapesqa_video.DIRECTIONS).index(t.direction) for t in clip.tracks],
    }
    out: dict[str, torch.Tensor] = {}
    background = owners < 0
    safe = owners.clamp(min=0)
    for key, values in columns.items():
        out[key] = torch.tensor(values)[safe].masked_fill(background, IGNORE).flatten()
    enter = torch.tensor([t.enter for t in clip.tracks])[safe]
    travelled = (frames - enter) * torch.tensor([t.speed for t in clip.tracks])[safe]  # pixels since entry
    out["direction"] = out["direction"].masked_fill((travelled < MOVED).flatten(), IGNORE)
    where = torch.tensor([[t.position(f) for f in range(clip.frames)] for t in clip.tracks]) / clip.size  # [K, F, 2]
    centres = where[safe, frames]  # [F, C, 2]
    centres = centres.masked_fill(background[..., None], float("nan"))
    out["centre"] = centres.flatten(0, 1)
    return out


def newline_targets(clip: shapesqa_video.Clip) -> dict[str, torch.Tensor]:
    """The clip's summary for its newline token, which has seen every frame: ``count``, the shapes that
    appeared, minus one (a class index)."""
    return {"count": torch.tensor(len(clip.tracks) - 1)}


def name_positions(input_ids: list[int], examples: list[shapesqa_video.Example], tokenizer) -> list[int | None]:
    """For each turn, the position of the shape word its question names (None when it names none).

    Questions are found in order after each ``USER :`` (the first one after the video's tokens); the
    named shape is the last shape word of the question.
    """
    user, colon, video = tokenizer.convert_tokens_to_ids(["USER", ":", "<video>"])
    starts = [t + 1 for t in range(1, len(input_ids)) if input_ids[t] == colon and input_ids[t - 1] == user]
    if len(starts) != len(examples):
        raise ValueError(f"found {len(starts)} questions in a row of {len(examples)} turns")
    out: list[int | None] = []
    for start, ex in zip(starts, examples, strict=True):
        while input_ids[start] == video:
            start += 1
        words = ex.question.split()
        shapes = [k for k, w in enumerate(words) if w in shapesqa.SHAPES]
        out.append(start + shapes[-1] if ex.about is not None else None)
    return out


def attention_targets(
    input_ids: torch.Tensor, clips: list[shapesqa_video.Clip], conversations: list[list], tokenizer, cell: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Where one attention head of three layers is trained to look, as ``(index [N, 2], keys [N, T])``.

    ``index`` holds (row, query position); ``keys`` is True at the positions the query should attend to.
    The routes are the steps a tiny model did not find from the answers alone:

    - ``history``: every visual token of a shape, after its entry frame, to that shape's tokens in its
      entry frame (where it came from: the direction is the difference);
    - ``fetch``: a direction or end question's shape word to the named shape's tokens in the last frame
      it is visible in (its direction so far, and whether that frame is the last); an order question's
      reply (the ``:`` after ``ASSISTANT``) to the first shape's tokens in its entry frame; a count
      question's reply to the newline that closes the video, which has seen every frame;
    - ``relay``: a direction or end question's reply to its shape word, where the answer was fetched.
    """
    from vtc.reference.targets import reply_positions

    video_id = tokenizer.convert_tokens_to_ids("<video>")
    routes: dict[str, tuple[list, list]] = {"history": ([], []), "fetch": ([], []), "relay": ([], [])}
    length = input_ids.shape[1]

    def add(route: str, row: int, query: int, keys: torch.Tensor) -> None:
        if keys.any():
            routes[route][0].append((row, query))
            routes[route][1].append(keys)

    for i, (row, clip, examples) in enumerate(zip(input_ids.tolist(), clips, conversations, strict=True)):
        video = [t for t, token in enumerate(row) if token == video_id]  # frames * cells, then the newline
        owners = cell_owners(clip, cell).flatten()  # [frames * cells]
        per_frame = len(owners) // clip.frames
        frame = torch.arange(len(owners)) // per_frame
        where = torch.tensor(video[:-1])

        def keys_of(chosen: torch.Tensor, where: torch.Tensor = where) -> torch.Tensor:
            mask = torch.zeros(length, dtype=torch.bool)
            mask[where[chosen]] = True
            return mask

        for n in range(len(owners)):
            k = int(owners[n])
            if k >= 0 and int(frame[n]) > clip.tracks[k].enter:
                add("history", i, video[n], keys_of((owners == k) & (frame == clip.tracks[k].enter)))
        replies = reply_positions(row, tokenizer)
        names = name_positions(row, examples, tokenizer)
        for reply, name, ex in zip(replies, names, examples, strict=True):
            if ex.type == "order":
                first = clip.tracks.index(clip.first())
                add("fetch", i, reply, keys_of((owners == first) & (frame == clip.first().enter)))
            elif ex.type == "count":
                add("fetch", i, reply, _at(length, video[-1]))
            else:
                k = clip.names.index(ex.about)
                add("fetch", i, name, keys_of((owners == k) & (frame == clip.tracks[k].leave)))
                add("relay", i, reply, _at(length, name))
    out = {}
    for route, (index, keys) in routes.items():
        if index:
            out[route] = (torch.tensor(index), torch.stack(keys))
        else:
            out[route] = (torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, length, dtype=torch.bool))
    return out


def _at(length: int, position: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.bool)
    mask[position] = True
    return mask
