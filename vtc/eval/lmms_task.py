"""ShapesQA as a local lmms-eval task, scored by vtc's own ShapesQA scorer.

:func:`export` writes a folder lmms-eval reads with ``--include_path``: a task YAML and the split it
reads (``data/<split>.jsonl`` plus ``data/images/``, the same rows ``vtc eval`` generates). The YAML
points every hook at the functions below, and those delegate to vtc's registered ``shapesqa`` task, so
the two harnesses share the question text, the reference answer and the scorer::

    vtc lmms-task lmms-tasks --rows 100
    lmms_eval --model vtc --model_args pretrained=reference,method=dart.r64 \\
        --tasks vtc_shapesqa --include_path lmms-tasks --batch_size 4 --output_path out

and ``vtc eval --model reference --tasks shapesqa --data shapesqa=lmms-tasks/data`` answers the
same rows. The prompt's chat template is applied by the model (:class:`vtc.eval.lmms.VTC` uses
:func:`vtc.eval.runner.build_prompt`, as ``vtc eval`` does).

This module does not import lmms-eval; lmms-eval imports it (the YAML names its functions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The lmms-eval task name the exported YAML registers.
TASK = "vtc_shapesqa"
#: The vtc task whose text, target and scorer the lmms-eval task uses.
SOURCE = "shapesqa"
#: ShapesQA's metrics the exported task reports (``accuracy`` first: the primary one).
METRICS = (
    "accuracy",
    "acc_exist",
    "acc_color",
    "acc_count",
    "acc_position",
    "acc_describe",
    "pope_f1",
    "chair_i",
    "chair_s",
)
LOWER_IS_BETTER = ("chair_i", "chair_s")
_AGGREGATE = "aggregate_"


def _task() -> Any:
    from vtc.eval.tasks import get_task

    return get_task(SOURCE)


# -- the hooks the YAML names ---------------------------------------------------------------------------------
def doc_to_visual(doc: Mapping[str, Any], kwargs: Mapping[str, Any] | None = None) -> list:
    """The doc's image(s), as RGB PIL images, read relative to the exported data folder."""
    from vtc.eval.data import load_images

    task = _task()
    return load_images(doc[task.visual], (kwargs or {}).get("root"))


def doc_to_text(doc: Mapping[str, Any], kwargs: Mapping[str, Any] | None = None) -> str:
    """The question text ``vtc eval`` sends (no image placeholder: the model's chat template adds it)."""
    return _task().text(doc)


def doc_to_target(doc: Mapping[str, Any]) -> str:
    return _task().target(doc)


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One record per metric, the record ``vtc eval`` writes for the doc (prediction, target, doc fields)."""
    task = _task()
    record = {"id": doc[task.id_key], "prediction": str(results[0]).strip(), "target": task.target(doc)}
    record.update({k: doc.get(k) for k in task.record_keys})
    return {metric: record for metric in METRICS}


def score(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """vtc's ShapesQA metrics of the records :func:`process_results` made."""
    return _task().score(records)


def _aggregator(metric: str) -> Any:
    def aggregate(records: Sequence[Mapping[str, Any]]) -> float:
        return float(score(records).get(metric, math.nan))  # nan: no row of that kind among those run

    aggregate.__name__ = aggregate.__qualname__ = f"{_AGGREGATE}{metric}"
    aggregate.__doc__ = f"ShapesQA's {metric!r} over the records of a run."
    return aggregate


def __getattr__(name: str) -> Any:
    """``aggregate_<metric>``: the aggregation function the YAML names for each of :data:`METRICS`."""
    if name.startswith(_AGGREGATE) and name[len(_AGGREGATE) :] in METRICS:
        return _aggregator(name[len(_AGGREGATE) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- writing the task -----------------------------------------------------------------------------------------
def task_config(data: str | Path, split: str = "test") -> dict[str, Any]:
    """The task YAML's content (``!function`` hooks as strings starting with ``!function``)."""
    task = _task()
    data = Path(data).resolve()
    here = __name__
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data / f"{split}.jsonl")}},
        "test_split": split,
        "output_type": "generate_until",
        "doc_to_visual": f"!function {here}.doc_to_visual",
        "doc_to_text": f"!function {here}.doc_to_text",
        "doc_to_target": f"!function {here}.doc_to_target",
        "process_results": f"!function {here}.process_results",
        # Greedy, as vtc eval decodes; no stop string (lmms-eval's default would be "\n\n").
        "generation_kwargs": {"max_new_tokens": task.max_new_tokens, "do_sample": False, "until": []},
        "metric_list": [
            {
                "metric": m,
                "aggregation": f"!function {here}.{_AGGREGATE}{m}",
                "higher_is_better": m not in LOWER_IS_BETTER,
            }
            for m in METRICS
        ],
        "lmms_eval_specific_kwargs": {"default": {"root": str(data)}},
        "metadata": {"version": 1.0},
    }


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """A small YAML writer for :func:`task_config` (dicts, lists, scalars; ``!function`` tags kept bare)."""
    pad = " " * indent
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        head = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, (dict, list)) and item:
            if isinstance(value, list) and isinstance(item, dict):  # "- key: value" then the rest indented
                sub = _yaml(item, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(head)
                lines.extend(_yaml(item, indent + 2))
        elif isinstance(item, str) and item.startswith("!function "):
            lines.append(f"{head} {item}")
        else:
            lines.append(f"{head} {json.dumps(item)}")  # JSON scalars and [] / {} are YAML too
    return lines


def export(folder: str | Path, rows: int = 100, split: str = "test") -> Path:
    """Write ShapesQA's first `rows` questions of `split` and a task YAML for them under `folder`.

    Returns the YAML's path. ``lmms_eval --include_path FOLDER --tasks vtc_shapesqa`` runs it;
    ``vtc eval --tasks shapesqa --data shapesqa=FOLDER/data`` runs the same rows.
    """
    from vtc.eval import shapesqa

    if rows < 1:
        raise ValueError(f"rows must be at least 1; got {rows}.")
    folder = Path(folder)
    data = folder / "data"
    shapesqa.write_split(data, split, rows)
    path = folder / f"{TASK}.yaml"
    path.write_text("\n".join(_yaml(task_config(data, split))) + "\n")
    return path
