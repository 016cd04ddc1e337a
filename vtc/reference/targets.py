"""The supervision targets of the reference VLM's training, read off a scene and its tokenised conversation.

Besides the answer tokens (:func:`answer_labels`), training supervises what a tiny model does not find from
the answers alone: the tower's per-patch colour and shape (:func:`patch_targets`), an early answer at a
question's own words (:func:`early_targets`), one head's attention from each name to the named object's
patches (:func:`attention_targets`), onward to where the answer is made (:func:`relay_targets`), and from
the token that answers onto the objects the question is about (:func:`filter_targets`). These
are pure functions of the data, kept apart from the loop, the losses and the schedule of
:mod:`vtc.reference.train`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vtc.eval import shapesqa
from vtc.reference.model import IMAGE_TOKEN


def coverage(scene: shapesqa.Scene, patch: int) -> torch.Tensor:
    """``[objects, P]``: the fraction of each patch (raster order) that each object covers."""
    objects = torch.from_numpy(shapesqa.object_map(scene).astype("int64"))  # [H, W], 0 = background
    g = scene.size // patch
    cells = objects.reshape(g, patch, g, patch).permute(0, 2, 1, 3).reshape(g * g, patch * patch)
    counts = torch.nn.functional.one_hot(cells, len(scene.objects) + 1).sum(dim=1)  # [P, objects + 1]
    return counts[:, 1:].T / (patch * patch)


def patch_targets(scene: shapesqa.Scene, patch: int) -> torch.Tensor:
    """``[2, P]`` per patch (raster order): 1 + colour and 1 + shape of the object covering most of it, or 0.

    An object counts when it covers at least a quarter of the patch. These are the auxiliary targets that
    teach the tower to see before the language model has learned to ask it anything.
    """
    cover = coverage(scene, patch)
    best = torch.where(cover.max(dim=0).values >= 0.25, 1 + cover.argmax(dim=0), 0)
    colors = torch.tensor([0] + [1 + list(shapesqa.COLORS).index(o.color) for o in scene.objects])
    shapes = torch.tensor([0] + [1 + shapesqa.SHAPES.index(o.shape) for o in scene.objects])
    return torch.stack([colors[best], shapes[best]])


def answer_labels(
    input_ids: torch.Tensor, tokenizer, scales: Sequence[Sequence[float]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` with every token outside the answers set to -100, and each labelled token's weight.

    An answer is what follows ``ASSISTANT :`` up to and including ``</s>``, in every turn of the row. Its
    tokens weigh ``1 / len(answer)``, so that every answer counts once in the loss however long it is (a
    description would otherwise outweigh the one-word answers). With `scales`, the k-th answer of row i
    counts ``scales[i][k]`` times instead (one scale per answer of the row).
    """
    assistant, colon = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    labels = torch.full_like(input_ids, -100)
    weights = torch.zeros(input_ids.shape)
    for i, row in enumerate(input_ids.tolist()):
        start, k = None, 0
        for t, token in enumerate(row):
            if start is not None:
                labels[i, t] = token
                if token == tokenizer.eos_token_id:
                    scale = 1.0 if scales is None else scales[i][k]
                    weights[i, start : t + 1] = scale / (t + 1 - start)
                    start, k = None, k + 1
            elif t and token == colon and row[t - 1] == assistant:
                start = t + 1
    return labels, weights


EARLY_TYPES = ("exist", "color", "position")  # one-word answers that hinge on finding named objects


def question_starts(row: list[int], examples: list[shapesqa.Example], tokenizer) -> list[int]:
    """Where each turn's question begins in a tokenised conversation (after ``USER :`` and the image)."""
    user, colon, image = tokenizer.convert_tokens_to_ids(["USER", ":", IMAGE_TOKEN])
    starts = [t + 1 for t in range(1, len(row)) if row[t] == colon and row[t - 1] == user]
    for k, start in enumerate(starts):
        while row[start] == image:  # the first turn's question follows the image
            start += 1
        starts[k] = start
    if len(starts) != len(examples):
        raise ValueError(f"found {len(starts)} questions in a row of {len(examples)} turns")
    return starts


def reply_positions(row: list[int], tokenizer) -> list[int]:
    """The ``:`` after each ``ASSISTANT`` in a tokenised conversation: the tokens that predict the answers."""
    assistant, colon = tokenizer.convert_tokens_to_ids(["ASSISTANT", ":"])
    return [t for t in range(1, len(row)) if row[t] == colon and row[t - 1] == assistant]


def named_objects(scene: shapesqa.Scene, question: str) -> list[tuple[int, int]]:
    """``(word offset, object index)`` for each shape word of ``question`` that names an object of ``scene``.

    "red circle" names the red circle; a bare "star" (colour questions) names the one star. A name the
    scene lacks (a negative existence question) names nothing.
    """
    words = question.split()
    named = []
    for k, word in enumerate(words):
        if word not in shapesqa.SHAPES:
            continue
        color = words[k - 1] if words[k - 1] in shapesqa.COLORS else None
        hits = [i for i, o in enumerate(scene.objects) if o.shape == word and color in (None, o.color)]
        if len(hits) == 1:
            named.append((k, hits[0]))
    return named


def early_targets(input_ids: torch.Tensor, conversations: list[list[shapesqa.Example]], tokenizer) -> torch.Tensor:
    """``[B, T]``: the answer word's id at the last shape word of each question whose type is in EARLY_TYPES.

    The training loss reads these positions out of a middle layer. It is deep supervision for the step a
    tiny model otherwise fails to find: fetching the named object from the image at the question's own
    words (where the name is), so that the answer position only has to copy it from there.
    """
    targets = torch.full_like(input_ids, -100)
    for i, (row, examples) in enumerate(zip(input_ids.tolist(), conversations, strict=True)):
        for start, ex in zip(question_starts(row, examples, tokenizer), examples, strict=True):
            if ex.type not in EARLY_TYPES:
                continue
            words = ex.question.split()
            offset = max(k for k, w in enumerate(words) if w in shapesqa.SHAPES)
            assert row[start + offset] == tokenizer.convert_tokens_to_ids(words[offset]), (ex, start)
            targets[i, start + offset] = tokenizer.convert_tokens_to_ids(ex.answer)
    return targets


def attention_targets(
    input_ids: torch.Tensor,
    scenes: list[shapesqa.Scene],
    conversations: list[list[shapesqa.Example]],
    tokenizer,
    patch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each question names an object, that object's patches, and the cell its centre is in.

    Returns ``index`` ``[N, 2]`` (row, token position of the shape word), ``patches`` ``[N, P]`` (True
    where the named object covers at least a quarter of the patch) and ``cells`` ``[N, 2]`` (the grid row
    and column of its centre). Training asks one attention head to look at the patches from the name, the
    retrieval that answer losses alone did not teach the tiny model, and a probe to read the cell from
    what it fetched, so that position questions have the places to compare.
    """
    index, patches, cells = [], [], []
    for i, (row, scene, examples) in enumerate(zip(input_ids.tolist(), scenes, conversations, strict=True)):
        cover = coverage(scene, patch) >= 0.25  # [objects, P]
        replies = reply_positions(row, tokenizer)
        for start, reply, ex in zip(question_starts(row, examples, tokenizer), replies, examples, strict=True):
            names = [(start + k, obj) for k, obj in named_objects(scene, ex.question)]
            if ex.type == "describe":  # and the objects a description names, as it names them
                names += [(reply + 1 + k, obj) for k, obj in named_objects(scene, ex.answer)]
            for at, obj in names:
                if cover[obj].any():
                    index.append((i, at))
                    patches.append(cover[obj])
                    cells.append((int(scene.objects[obj].y // patch), int(scene.objects[obj].x // patch)))
    if not index:
        none = torch.zeros(0, 2, dtype=torch.long)
        return none, torch.zeros(0, (scenes[0].size // patch) ** 2, dtype=torch.bool), none
    return torch.tensor(index), torch.stack(patches), torch.tensor(cells)


def relay_targets(
    input_ids: torch.Tensor, scenes: list[shapesqa.Scene], conversations: list[list[shapesqa.Example]], tokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, 3]`` (row, from, to) token pairs, one attention head is trained to look along, in two layers.

    ``links``: a position question's second shape word looks at its first (so that both objects' places
    meet where the comparison is made); ``answers``: the token that predicts an early-answered question's
    answer (``:`` after ``ASSISTANT``) looks at the question's last shape word, where the early answer is.
    Without them the tiny model found the right object from its name but did not carry it onward.
    """
    links, answers = [], []
    for i, (row, scene, examples) in enumerate(zip(input_ids.tolist(), scenes, conversations, strict=True)):
        replies = reply_positions(row, tokenizer)
        for start, reply, ex in zip(question_starts(row, examples, tokenizer), replies, examples, strict=True):
            if ex.type not in EARLY_TYPES:
                continue
            words = ex.question.split()
            shapes = [k for k, w in enumerate(words) if w in shapesqa.SHAPES]
            answers.append((i, reply, start + shapes[-1]))
            if ex.type == "position" and len(named_objects(scene, ex.question)) == 2:
                links.append((i, start + shapes[1], start + shapes[0]))
    as_tensor = lambda pairs: torch.tensor(pairs, dtype=torch.long).reshape(-1, 3)  # noqa: E731
    return as_tensor(links), as_tensor(answers)


def filter_targets(
    input_ids: torch.Tensor,
    scenes: list[shapesqa.Scene],
    conversations: list[list[shapesqa.Example]],
    tokenizer,
    patch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each turn's answering token and the patches of the objects its question is about.

    Returns ``index`` ``[N, 2]`` (row, position of the ``:`` after ``ASSISTANT``) and ``patches`` ``[N, P]``
    (True where an object the question names covers at least a quarter of the patch; every object's
    patches when the question names none the scene has: counts, descriptions, absent objects). Training
    asks the answering token's attention at one early layer to fall on them: the property of large VLMs
    that early-layer filtering (GemFilter) relies on, which a tiny model trained on answers alone lacks.
    """
    index, patches = [], []
    for i, (row, scene, examples) in enumerate(zip(input_ids.tolist(), scenes, conversations, strict=True)):
        cover = coverage(scene, patch) >= 0.25  # [objects, P]
        for reply, ex in zip(reply_positions(row, tokenizer), examples, strict=True):
            named = sorted({obj for _, obj in named_objects(scene, ex.question)}) if ex.type != "describe" else []
            about = cover[named].any(dim=0) if named else cover.any(dim=0)
            if about.any():
                index.append((i, reply))
                patches.append(about)
    if not index:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, (scenes[0].size // patch) ** 2, dtype=torch.bool)
    return torch.tensor(index), torch.stack(patches)
