"""Reading benchmark data in the layouts users already have.

A task's data may be:

* the lmms-lab dataset on the hub (``datasets.load_dataset``; needs ``datasets`` and a reachable hub);
* a local copy of it: a folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``),
  or its parquet files (a hub snapshot: ``data/test-00000-of-00001.parquet``), a single parquet file;
* for a synthetic task (ShapesQA), nothing: its split is generated, seeded, on first use and cached
  under ``$VTC_CACHE`` (default ``~/.cache/vtc``);
* plain JSON lines (``<root>/<split>.jsonl`` or any ``.jsonl`` file), one doc per line, whose image or
  video column holds a path relative to the file's folder (or to ``media_root``);
* MVBench's own layout (the ``OpenGVLab/MVBench`` repository): ``json/<subtask>.json`` files, each a
  JSON array of rows, and the videos under ``video/<source>/`` (:data:`MVBENCH_FOLDERS`); each row gets
  its ``subtask`` from its file's name.

Video-MME's layout (``lmms-lab/Video-MME``: ``videomme/test-*.parquet`` with the clips unzipped into
``data/<videoID>.mp4``) is the parquet case, its ``videoID`` column naming the clip.

Images may arrive as PIL images, ``{"bytes": ..., "path": ...}`` dicts (the hub's Image feature in
parquet and arrow), raw bytes, or paths. A missing or malformed dataset raises an error that names the
file and the columns the task expects.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vtc.eval.tasks import Task

logger = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")


def load_docs(
    task: Task,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    media_root: str | Path | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The task's docs, filtered by ``task.where``, each with ``_id`` and ``_root`` added.

    Args:
        task: the task whose columns are required.
        source: a JSONL / parquet / arrow file, a folder holding one of the layouts above, or None for
            the hub dataset ``task.hub``.
        split: the split to read (default: the task's).
        media_root: the folder relative image and video paths start from (default: the data's folder).
        limit: keep only the first `limit` docs (after filtering).

    Raises:
        FileNotFoundError: `source` does not exist or holds no dataset in a known layout.
        ValueError: rows lack columns the task needs (the message names the file and the columns).
        ImportError: the layout needs ``datasets`` or ``pyarrow`` and it is not installed.
    """
    split = split or (task.hub[2] if source is None and task.hub else task.split)
    if source is None and task.make_split is not None:
        source = generated_split(task, split)
    if source is None:
        rows, origin, root = _from_hub(task, split), f"the hub dataset {task.hub[0] if task.hub else '?'}", None
    else:
        path = Path(source).expanduser()
        rows, origin = _from_path(path, split)
        root = path if path.is_dir() else path.parent
    root = Path(media_root) if media_root is not None else root
    docs: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        doc = dict(row)
        if "image" not in doc and "imageId" in doc:  # GQA's question files name the image by id
            doc["image"] = f"{doc['imageId']}.jpg"
        if i == 0:
            _check_columns(task, doc, origin)
        if task.where is not None and not task.where(doc):
            continue
        key = str(doc[task.id_key]) if task.id_key else str(i)
        seen[key] = seen.get(key, 0) + 1
        doc["_id"] = key if seen[key] == 1 else f"{key}#{seen[key]}"  # ids must be unique to resume by them
        doc["_root"] = str(root) if root is not None else None
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise ValueError(f"{origin} has no rows for task {task.name!r} (split {split!r}).")
    return docs


def cache_root() -> Path:
    """Where generated datasets are kept: ``$VTC_CACHE``, else ``~/.cache/vtc``."""
    return Path(os.environ.get("VTC_CACHE") or Path.home() / ".cache" / "vtc").expanduser()


def generated_split(task: Task, split: str) -> Path:
    """The folder holding `task`'s generated `split` (``<split>.jsonl`` plus media), written on first use.

    It is written into a temporary folder beside its place and renamed into it, so an interrupted or
    concurrent first use never leaves a half-written split behind.
    """
    if task.make_split is None:
        raise ValueError(f"task {task.name!r} is not generated; pass its data with --data.")
    folder = cache_root() / "data" / task.name / split
    if (folder / f"{split}.jsonl").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("writing %s split %r to %s (first use)", task.name, split, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=folder.parent))
    try:
        task.make_split(tmp, split)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep its copy
            if not (folder / f"{split}.jsonl").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_columns(task: Task, doc: dict[str, Any], origin: str) -> None:
    missing = [c for c in task.columns if c not in doc]
    if missing:
        raise ValueError(
            f"{origin} does not look like {task.name!r} data: its rows lack {missing}. Expected columns: "
            f"{', '.join(task.columns)} (found: {', '.join(sorted(doc))})."
        )


def _from_path(path: Path, split: str) -> tuple[Iterable[dict[str, Any]], str]:
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}: the path does not exist.")
    if path.is_file():
        return _read_file(path), str(path)
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return _read_saved(path), str(path)
    if (path / "dataset_dict.json").exists():
        if not (path / split).is_dir():
            raise FileNotFoundError(f"{path} is a saved DatasetDict without a split {split!r}.")
        return _read_saved(path / split), str(path / split)
    jsonl = path / f"{split}.jsonl"
    if jsonl.exists():
        return _read_jsonl(jsonl), str(jsonl)
    subtasks = sorted((path / "json").glob("*.json")) if (path / "json").is_dir() else []
    if subtasks:  # MVBench: one JSON array per subtask
        return ({**row, "subtask": f.stem} for f in subtasks for row in _read_json(f)), f"{path / 'json'}"
    parquet = sorted(path.rglob("*.parquet"))
    picked = [p for p in parquet if p.name.startswith(f"{split}-") or p.name == f"{split}.parquet"]
    if picked or parquet:
        files = picked or parquet
        return (row for f in files for row in _read_parquet(f)), ", ".join(str(f) for f in files)
    raise FileNotFoundError(
        f"no dataset found in {path}: expected {split}.jsonl, parquet files named {split}-*.parquet, or a folder "
        f"written by datasets' save_to_disk (with dataset_info.json)."
    )


def _read_file(path: Path) -> Iterable[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".arrow":
        return _read_arrow(path)
    raise ValueError(f"{path}: unknown data file type {suffix!r}; expected .jsonl, .parquet or .arrow.")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}, line {n}: not valid JSON ({exc.msg}); expected one JSON object a line."
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object with the task's columns.")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A ``.json`` file: a JSON array of rows (MVBench's files), else JSON lines."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); expected an array of rows.") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON array of objects with the task's columns.")
    return rows


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("reading parquet or arrow data needs pyarrow: pip install 'vtc-vlm[eval]'.") from exc
    return pyarrow


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    pa = _pyarrow()
    try:
        return pa.parquet.read_table(path).to_pylist()
    except pa.ArrowInvalid as exc:
        raise ValueError(f"{path}: not a readable parquet file ({exc}).") from None


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    pa = _pyarrow()
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all().to_pylist()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all().to_pylist()


def _read_saved(path: Path) -> list[dict[str, Any]]:
    """A ``save_to_disk`` folder: through ``datasets`` when installed, else its arrow shards directly."""
    try:
        import datasets
    except ImportError:
        shards = sorted(path.glob("*.arrow"))
        if not shards:
            raise FileNotFoundError(f"{path} has dataset_info.json but no .arrow shards.") from None
        return [row for s in shards for row in _read_arrow(s)]
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"{path} holds several splits ({', '.join(data)}); pass the folder of one of them.")
    return list(data.cast(_undecoded_features(data.features)))


def _undecoded_features(features: Any) -> Any:
    """The same features with images left as {bytes, path} dicts, so reading stays lazy and uniform."""
    import datasets

    out = features.copy()
    for k, v in features.items():
        if isinstance(v, datasets.Image):
            out[k] = datasets.Image(decode=False)
    return out


def _from_hub(task: Task, split: str) -> Iterable[dict[str, Any]]:
    if task.hub is None:
        raise FileNotFoundError(f"task {task.name!r} has no hub dataset; pass the folder of its data (--data).")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"loading {task.hub[0]} from the hub needs `datasets` (pip install 'vtc-vlm[eval]'); or pass a local copy "
            f"(a save_to_disk folder, parquet files, or JSONL plus images) with --data."
        ) from exc
    path, name, _ = task.hub
    try:
        data = datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # offline, gated, or renamed: say what to do instead
        raise FileNotFoundError(
            f"could not load {path} ({name or 'default'}, split {split}) from the hub: {exc}. Pass a local copy with "
            f"--data (a save_to_disk folder, parquet files, or {split}.jsonl plus an image folder)."
        ) from None
    rows = data.cast(_undecoded_features(data.features))
    if task.name == "gqa" and "image" not in data.column_names:  # GQA keeps its images in a second config
        images = datasets.load_dataset(path, "testdev_balanced_images", split=split)
        by_id = {r["id"]: r["image"] for r in images.cast(_undecoded_features(images.features))}
        return ({**r, "image": by_id[r["imageId"]]} for r in rows)
    return rows


# -- media -----------------------------------------------------------------------------------------------------
def load_image(value: Any, root: str | Path | None):
    """A PIL RGB image from any of the forms a dataset stores (see the module docstring)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if not value:
        raise ValueError("a doc has no image (an empty image column).")
    path = media_path(str(value), root)
    if not path.exists():
        raise FileNotFoundError(f"image {path} not found (the image column holds {value!r}, read relative to {root}).")
    return Image.open(path).convert("RGB")


def load_images(value: Any, root: str | Path | None) -> list:
    """One or several images (SEED-Bench stores a list)."""
    return [load_image(v, root) for v in value] if isinstance(value, (list, tuple)) else [load_image(value, root)]


def media_path(value: str, root: str | Path | None) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or root is None else Path(root) / path


def find_video(value: Any, root: str | Path | None, folders: Sequence[str] = ()) -> Path:
    """The video a doc names: a path, or an id (Video-MME's ``videoID``) with a video suffix, looked for
    under `root`, its ``data/`` folder, and the `folders` given (relative to `root`). A folder of frame
    images counts as a video."""
    if isinstance(value, dict):
        value = value.get("path")
    name = str(value)
    bases = [media_path(name, root)]
    if root is not None:
        bases += [Path(root) / f / name for f in (*folders, "data")]
    candidates = [c for b in bases for c in [b, *(b.with_name(b.name + s) for s in VIDEO_SUFFIXES)]]
    for c in candidates:
        if c.is_file() or (c.is_dir() and c != Path(root or ".")):
            return c
    tried = ", ".join(str(b) for b in bases[:4])
    raise FileNotFoundError(f"video {value!r} not found under {root} (tried {tried}, each also with {VIDEO_SUFFIXES}).")


#: MVBench subtask -> the folders its videos are in, relative to the dataset root: the ``OpenGVLab/MVBench``
#: repository's (under ``video/``, whole clips, so a row's ``start`` / ``end`` picks its part), then
#: lmms-eval's cache (clips already cut to the part: the row's ``start`` / ``end`` no longer apply).
MVBENCH_FOLDERS: dict[str, tuple[str, ...]] = {
    "action_sequence": ("star/Charades_v1_480", "star/Charades_segment"),
    "action_prediction": ("star/Charades_v1_480", "star/Charades_segment"),
    "object_interaction": ("star/Charades_v1_480", "star/Charades_segment"),
    "action_antonym": ("ssv2_video", "ssv2_video_mp4"),
    "fine_grained_action": ("Moments_in_Time_Raw/videos",),
    "unexpected_action": ("FunQA_test/test",),
    "object_existence": ("clevrer/video_validation",),
    "moving_direction": ("clevrer/video_validation",),
    "moving_count": ("clevrer/video_validation",),
    "moving_attribute": ("clevrer/video_validation",),
    "counterfactual_inference": ("clevrer/video_validation",),
    "object_shuffle": ("perception/videos",),
    "action_count": ("perception/videos",),
    "state_change": ("perception/videos",),
    "character_order": ("perception/videos",),
    "action_localization": ("sta/sta_video", "sta/sta_video_segment"),
    "scene_transition": ("scene_qa/video",),
    "fine_grained_pose": ("nturgbd", "nturgbd_convert"),
    "egocentric_navigation": ("vlnqa",),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "tvqa/video_fps3_hq_segment"),
}
#: lmms-eval's folders whose clips are already cut to a row's start..end.
_CUT_FOLDERS = ("_segment", "ssv2_video_mp4", "nturgbd_convert")


def locate_video(doc: dict[str, Any], column: str) -> tuple[Path, dict[str, float]]:
    """A video doc's clip and the window to sample from it (``start`` / ``end`` seconds; empty: all of it).

    An MVBench row is looked for in its subtask's folders (:data:`MVBENCH_FOLDERS`), under ``video/`` as the
    repository has them and at the root as lmms-eval's cache does; its ``start`` / ``end`` apply only to a
    whole clip, not to one lmms-eval already cut.
    """
    root = doc.get("_root")
    folders = MVBENCH_FOLDERS.get(str(doc.get("subtask", "")), ())
    path = find_video(doc[column], root, [p for f in folders for p in (f"video/{f}", f)])
    window = {k: float(doc[k]) for k in ("start", "end") if doc.get(k) is not None}
    if window and any(part in str(path) for part in _CUT_FOLDERS):
        window = {}
    return path, window
