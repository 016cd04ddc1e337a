"""The benchmarks, as data: where each lives, the prompt the papers used, how answers are scored.

A task turns a dataset row (a *doc*, with the column names of the lmms-lab dataset on the hub) into
the text of a prompt and a reference answer, and scores a run's records. Prompts follow LLaVA-1.5's
evaluation (``"\\nAnswer the question using a single word or phrase."`` for short answers,
``"\\nAnswer with the option's letter from the given choices directly."`` for multiple choice), which
is also lmms-eval's default and what its Qwen2-VL model class uses. The image placeholder is not part
of the text: the runner adds it through the processor's chat template (or LLaVA-1.5's format).

Each record the runner writes keeps the doc fields named in ``record_keys``, so a run can be rescored
from its predictions file alone.
"""

from __future__ import annotations

import dataclasses
import string
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vtc.eval import choices, scoring
from vtc.registry import Registry

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
Doc = Mapping[str, Any]
Record = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark (or one split of it).

    Attributes:
        name: the registry name (``vtc eval --tasks NAME``).
        columns: doc columns a dataset must have; a loader names the missing ones.
        text: doc -> prompt text (question, options, instruction), without any image placeholder.
        target: doc -> the reference answer stored with each prediction (a letter, a word, ...).
        score: records -> metrics; each record has ``prediction``, ``target`` and the ``record_keys``.
        primary: the metric a report puts first (and compares with dense).
        hub: ``(path, config name or None, split)`` of the lmms-lab dataset on the hub.
        split: the local split file to read (``<root>/<split>.jsonl``) when none is given.
        visual: the doc column holding the image(s) or the video.
        modality: ``"image"`` or ``"video"``.
        max_new_tokens: lmms-eval's generation length for the task.
        where: keep only docs for which this returns True (POPE's three subsets share one file).
        id_key: the doc column that identifies a question (resuming and joining key on it).
        record_keys: doc columns kept with each prediction for scoring.
        extras: doc -> further values kept with each prediction (derived ones, e.g. MMBench's options).
        make_split: ``(folder, split)`` -> writes ``<folder>/<split>.jsonl`` and its media: a synthetic
            task's data, generated (seeded) on first use and cached when no data is given.
    """

    name: str
    columns: tuple[str, ...]
    text: Callable[[Doc], str]
    target: Callable[[Doc], Any]
    score: Callable[[Sequence[Record]], dict[str, float]]
    primary: str
    hub: tuple[str, str | None, str] | None = None
    split: str = "test"
    visual: str = "image"
    modality: str = "image"
    max_new_tokens: int = 16
    where: Callable[[Doc], bool] | None = None
    id_key: str = "question_id"
    record_keys: tuple[str, ...] = ()
    extras: Callable[[Doc], dict[str, Any]] | None = None
    make_split: Callable[[Any, str], Any] | None = None


TASKS: Registry[Task] = Registry("task", error=ValueError)


def register(task: Task) -> Task:
    return TASKS.register(task.name, task)


def get_task(name: str) -> Task:
    """The task registered as `name`; a ValueError with a did-you-mean for an unknown one."""
    return TASKS.get(name)


def list_tasks() -> list[str]:
    return TASKS.names()


def _q(doc: Doc, suffix: str = SHORT) -> str:
    return f"{str(doc['question']).strip()}{suffix}"


def _accuracy(fn: Callable[[Record], float]) -> Callable[[Sequence[Record]], dict[str, float]]:
    def score(records: Sequence[Record]) -> dict[str, float]:
        return {"accuracy": scoring.mean(fn(r) for r in records), "n": float(len(records))}

    return score


# -- POPE -------------------------------------------------------------------------------------------------
def _pope_score(records: Sequence[Record]) -> dict[str, float]:
    return scoring.pope_metrics([r["prediction"] for r in records], [r["target"] for r in records])


for _subset in ("random", "popular", "adversarial", "all"):
    register(
        Task(
            name="pope" if _subset == "all" else f"pope_{_subset}",
            columns=("question_id", "question", "answer", "image", "category"),
            text=_q,
            target=lambda d: str(d["answer"]).lower().strip(),
            score=_pope_score,
            primary="f1",
            hub=("lmms-lab/POPE", None, "test"),
            max_new_tokens=128,
            where=None if _subset == "all" else (lambda d, s=_subset: d["category"] == s),
            record_keys=("category",),
        )
    )

# -- GQA, VQAv2, TextVQA -------------------------------------------------------------------------------------
register(
    Task(
        name="gqa",
        columns=("id", "question", "answer", "image"),
        text=_q,
        target=lambda d: str(d["answer"]),
        score=_accuracy(lambda r: scoring.exact_match(r["prediction"], r["target"])),
        primary="accuracy",
        hub=("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
        split="testdev",
        id_key="id",
    )
)


def _vqa_answers(doc: Doc) -> list[str]:
    return [a["answer"] if isinstance(a, Mapping) else str(a) for a in doc["answers"]]


register(
    Task(
        name="vqav2",
        columns=("question_id", "question", "answers", "image"),
        text=_q,
        target=_vqa_answers,
        score=_accuracy(lambda r: scoring.vqa_accuracy(r["prediction"], r["target"])),
        primary="accuracy",
        hub=("lmms-lab/VQAv2", None, "validation"),
        split="validation",
    )
)
register(
    Task(
        name="textvqa",
        columns=("question_id", "question", "answers", "image"),
        # lmms-eval capitalises the question (which also lower-cases the rest of it); kept for equal prompts.
        text=lambda d: f"{str(d['question']).capitalize()}{SHORT}",
        target=_vqa_answers,
        score=_accuracy(lambda r: scoring.vqa_accuracy(r["prediction"], r["target"], full_processor=True)),
        primary="accuracy",
        hub=("lmms-lab/textvqa", None, "validation"),
        split="validation",
    )
)


# -- MME ----------------------------------------------------------------------------------------------------
def _mme_score(records: Sequence[Record]) -> dict[str, float]:
    rows = [
        {"prediction": r["prediction"], "answer": r["target"], "category": r["category"], "image_id": r["question_id"]}
        for r in records
    ]
    return {**scoring.mme_scores(rows), "n": float(len(rows))}


register(
    Task(
        name="mme",
        columns=("question_id", "question", "answer", "image", "category"),
        # MME's questions end in " Please answer yes or no."; LLaVA-1.5 replaces it with the short-answer line.
        text=lambda d: _q({"question": str(d["question"]).strip().replace(" Please answer yes or no.", "")}),
        target=lambda d: str(d["answer"]),
        score=_mme_score,
        primary="perception",
        hub=("lmms-lab/MME", None, "test"),
        record_keys=("category", "question_id"),
    )
)


# -- multiple choice ------------------------------------------------------------------------------------------
def _letters(n: int) -> str:
    return string.ascii_uppercase[:n]


def _sqa_text(doc: Doc) -> str:
    choices = list(doc["choices"])
    options = "\n".join(f"{c}. {t}" for c, t in zip(_letters(len(choices)), choices, strict=True))
    context = f"Context: {doc['hint']}\n" if doc.get("hint") else ""
    return f"{context}{doc['question']}\n{options}{LETTER}"


register(
    Task(
        name="scienceqa_img",
        columns=("question", "choices", "answer", "image"),
        text=_sqa_text,
        target=lambda d: _letters(len(d["choices"]))[int(d["answer"])],
        score=_accuracy(lambda r: scoring.scienceqa_match(r["prediction"], r["target"])),
        primary="accuracy",
        hub=("lmms-lab/ScienceQA", "ScienceQA-IMG", "test"),
        id_key="",
    )
)


def _mmbench_options(doc: Doc) -> dict[str, str]:
    out = {}
    for c in "ABCDE":
        v = doc.get(c)
        if v is not None and str(v) != "nan" and str(v) != "":
            out[c] = str(v)
    return out


def _mmbench_text(doc: Doc) -> str:
    options = "There are several options:\n" + "\n".join(f"{k}. {v}" for k, v in _mmbench_options(doc).items())
    hint = doc.get("hint")
    head = f"{hint} {doc['question']}" if hint is not None and str(hint) not in ("", "nan") else f"{doc['question']}"
    return f"{head} {options}{LETTER}"


def _mmbench_score(records: Sequence[Record]) -> dict[str, float]:
    out = scoring.mmbench_accuracy(
        {**r, "answer": r["target"], "options": r["options"], "category": r.get("category", "")} for r in records
    )
    out["accuracy"] = out.pop("overall")
    return {**out, "n": float(len(records))}


register(
    Task(
        name="mmbench_en_dev",
        columns=("index", "question", "answer", "A", "B", "image"),
        text=_mmbench_text,
        target=lambda d: str(d["answer"]),
        score=_mmbench_score,
        primary="accuracy",
        hub=("lmms-lab/MMBench", "en", "dev"),
        split="dev",
        id_key="index",
        record_keys=("index", "category"),
        extras=lambda d: {"options": _mmbench_options(d)},
    )
)


def _seed_text(doc: Doc) -> str:
    opts = "\n".join(f"{c}. {doc[f'choice_{c.lower()}']}" for c in "ABCD")
    return f"{doc['question']}\n{opts}\nAnswer with the option's letter from the given choices directly."


def _seed_score(records: Sequence[Record]) -> dict[str, float]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in records:
        ok = float(choices.seed_letter(r["prediction"]).lower() == str(r["target"]).lower().strip())
        by["accuracy"].append(ok)
        by[f"seed/{r.get('data_type', 'image')}"].append(ok)
    return {**{k: scoring.mean(v) for k, v in by.items()}, "n": float(len(records))}


register(
    Task(
        name="seedbench",
        columns=("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "image"),
        text=_seed_text,
        target=lambda d: str(d["answer"]),
        score=_seed_score,
        primary="accuracy",
        hub=("lmms-lab/SEED-Bench", None, "test"),
        where=lambda d: d.get("data_type", "image") == "image",
        record_keys=("data_type",),
    )
)


# -- video ---------------------------------------------------------------------------------------------------
def _videomme_score(records: Sequence[Record]) -> dict[str, float]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in records:
        ok = float(choices.extract_choice(r["prediction"], "ABCD").lower() == str(r["target"]).lower())
        by["accuracy"].append(ok)
        by[f"videomme/{r.get('duration', '')}"].append(ok)
    return {**{k: 100 * scoring.mean(v) for k, v in by.items()}, "n": float(len(records))}


register(
    Task(
        name="videomme",
        columns=("question_id", "question", "options", "answer", "videoID"),
        text=lambda d: f"{d['question']}\n" + "\n".join(str(o) for o in d["options"]) + LETTER,
        target=lambda d: str(d["answer"]),
        score=_videomme_score,
        primary="accuracy",
        hub=("lmms-lab/Video-MME", None, "test"),
        visual="videoID",
        modality="video",
        record_keys=("duration", "task_type"),
    )
)


def _mvbench_target(doc: Doc) -> str:
    for letter, cand in zip(string.ascii_uppercase, doc["candidates"], strict=False):
        if cand == doc["answer"]:
            return letter
    raise ValueError(f"MVBench row {doc.get('video')!r}: the answer {doc['answer']!r} is not among its candidates.")


def _mvbench_score(records: Sequence[Record]) -> dict[str, float]:
    # MVBench (as lmms-eval scores it) leaves empty answers out of the denominator; per subtask as well.
    answered = [r for r in records if r["prediction"] != ""]
    by: dict[str, list[float]] = defaultdict(list)
    for r in answered:
        ok = scoring.mvbench_match(r["prediction"], r["target"])
        by["accuracy"].append(ok)
        if r.get("subtask"):
            by[f"mvbench/{r['subtask']}"].append(ok)
    out = {k: 100 * scoring.mean(v) for k, v in by.items()} if answered else {"accuracy": 0.0}
    return {**out, "answered": float(len(answered)), "n": float(len(records))}


register(
    Task(
        name="mvbench",
        columns=("video", "question", "candidates", "answer"),
        text=lambda d: (
            "Question:"
            + str(d["question"])
            + "\nOption:\n"
            + "".join(f"({c}) {o}\n" for c, o in zip(string.ascii_uppercase, d["candidates"], strict=False))
            + "Only give the best option.\n"
        ),
        target=_mvbench_target,
        score=_mvbench_score,
        primary="accuracy",
        hub=("OpenGVLab/MVBench", None, "train"),
        split="train",
        visual="video",
        modality="video",
        id_key="",
        record_keys=("subtask",),
    )
)


# -- ShapesQA (the synthetic benchmark of vtc.eval.shapesqa) ----------------------------------------------------
def _shapes_score(records: Sequence[Record]) -> dict[str, float]:
    from vtc.eval import shapesqa

    rows = [{"type": r["type"], "answer": r["target"], "objects": r["objects"]} for r in records]
    return shapesqa.score(rows, [r["prediction"] for r in records])


#: Questions in a generated ShapesQA split (``--limit`` takes the first N; rows do not depend on N).
SHAPESQA_ROWS = 1000


def _shapes_task(name: str, geometry: str) -> Task:
    """ShapesQA or one of its variants (the same questions and scoring over other scenes)."""

    def make_split(root: Any, split: str) -> Any:
        from vtc.eval import shapesqa

        return shapesqa.write_split(root, split, SHAPESQA_ROWS, geometry)

    return Task(
        name=name,
        columns=("id", "image", "question", "answer", "type", "objects"),
        text=lambda d: str(d["question"]),  # as the reference model was trained: no answer-format suffix
        target=lambda d: str(d["answer"]),
        score=_shapes_score,
        primary="accuracy",
        split="test",
        max_new_tokens=48,
        id_key="id",
        record_keys=("type", "pope", "objects"),
        make_split=make_split,
    )


register(_shapes_task("shapesqa", "shapesqa"))
#: ShapesQA-hard: 192 px scenes of up to 9 objects, 576 visual tokens (``--model reference-hard``).
register(_shapes_task("shapesqa_hard", "shapesqa_hard"))


# -- ShapesQA-Video (the synthetic video benchmark of vtc.eval.shapesqa_video) ------------------------------------
def _shapes_video_score(records: Sequence[Record]) -> dict[str, float]:
    from vtc.eval import shapesqa_video

    rows = [{"type": r["type"], "answer": r["target"]} for r in records]
    return shapesqa_video.score(rows, [r["prediction"] for r in records])


#: Questions in a generated ShapesQA-Video split (lossless clips, about 28 KB each; ``--limit`` takes the first N).
SHAPESQA_VIDEO_ROWS = 500


def _shapes_video_split(root: Any, split: str) -> Any:
    from vtc.eval import shapesqa_video

    return shapesqa_video.write_split(root, split, SHAPESQA_VIDEO_ROWS)


register(
    Task(
        name="shapesqa_video",
        columns=("id", "video", "question", "answer", "type"),
        text=lambda d: str(d["question"]),  # as the video reference model was trained: no answer-format suffix
        target=lambda d: str(d["answer"]),
        score=_shapes_video_score,
        primary="accuracy",
        split="test",
        visual="video",
        modality="video",
        max_new_tokens=8,
        id_key="id",
        record_keys=("type", "objects"),
        make_split=_shapes_video_split,
    )
)
