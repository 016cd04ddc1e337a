"""The lmms-eval bridge: ShapesQA exported as an lmms-eval task, and lmms-eval's own command line run on it.

The fast tests check the exported task without lmms-eval: its YAML, its rows, and that its hooks prompt
and score exactly as ``vtc eval`` does. The ``slow`` test runs ``scripts/lmms-check.sh``: it builds
.venv-lmms (lmms-eval 0.7.3 layered on this venv; a minute or two the first time), runs
``python -m lmms_eval --model vtc`` and ``vtc eval`` on the same 12 rows, dense and dart.r64, and fails
on any difference in a prediction or a score (``pytest -m slow tests/eval/test_lmms.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vtc.eval import lmms_task, shapesqa
from vtc.eval.data import load_docs, load_images
from vtc.eval.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]


def _read_yaml(path: Path) -> dict:
    """The task YAML as lmms-eval reads it: ``!function module.name`` resolved to the function."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node):
        module, name = loader.construct_scalar(node).rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    Loader.add_constructor("!function", function)
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return lmms_task.export(tmp_path_factory.mktemp("lmms-task"), rows=10)


def test_export_writes_the_task_and_its_rows(exported) -> None:
    config = _read_yaml(exported)
    assert config["task"] == lmms_task.TASK and config["output_type"] == "generate_until"
    data = exported.parent / "data"
    assert config["dataset_path"] == "json"
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == (data / "test.jsonl").resolve()
    assert config["generation_kwargs"] == {"max_new_tokens": 48, "do_sample": False, "until": []}
    assert [m["metric"] for m in config["metric_list"]] == list(lmms_task.METRICS)
    assert all(m["aggregation"].__name__ == f"aggregate_{m['metric']}" for m in config["metric_list"])
    rows = shapesqa.read_split(data)
    assert rows == [row for row, _ in shapesqa.split_rows("test", 10)]  # the rows vtc eval generates


def test_hooks_prompt_and_score_as_vtc_eval_does(exported) -> None:
    config = _read_yaml(exported)
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    task = get_task("shapesqa")
    docs = load_docs(task, exported.parent / "data")
    rows = shapesqa.read_split(exported.parent / "data")
    for doc, row in zip(docs, rows, strict=True):
        assert config["doc_to_text"](row, kwargs) == task.text(doc)
        assert config["doc_to_target"](row) == task.target(doc)
        got, want = config["doc_to_visual"](row, kwargs), load_images(doc["image"], doc["_root"])
        assert [img.tobytes() for img in got] == [img.tobytes() for img in want]
    # Half right, half wrong: every metric must come out as vtc's scorer computes it.
    predictions = [row["answer"] if i % 2 else "no" for i, row in enumerate(rows)]
    per_doc = [config["process_results"](row, [f" {p} "]) for row, p in zip(rows, predictions, strict=True)]
    want = shapesqa.score(rows, predictions)
    for entry in config["metric_list"]:
        metric = entry["metric"]
        got = entry["aggregation"]([results[metric] for results in per_doc])
        assert got == pytest.approx(want[metric]), metric
    assert 0 < want["accuracy"] < 1


def test_a_metric_with_no_rows_is_nan(exported) -> None:
    rows = shapesqa.read_split(exported.parent / "data")[:1]  # one "exist" question: no description
    records = [lmms_task.process_results(rows[0], ["yes"])["chair_i"]]
    assert math.isnan(lmms_task.aggregate_chair_i(records))
    with pytest.raises(AttributeError):
        lmms_task.aggregate_bleu  # noqa: B018


def _check_module():
    spec = importlib.util.spec_from_file_location("lmms_check", ROOT / "scripts" / "lmms_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_reports_every_difference() -> None:
    compare = _check_module().compare
    run = {"predictions": {"a": "yes", "b": "red"}, "metrics": {"accuracy": 0.5, "chair_i": math.nan}}
    assert compare(run, json.loads(json.dumps(run)), ("accuracy", "chair_i")) == []
    other = {"predictions": {"a": "yes", "b": "blue"}, "metrics": {"accuracy": 1.0, "chair_i": math.nan}}
    problems = compare(run, other, ("accuracy", "chair_i"))
    assert len(problems) == 2 and "b: vtc 'red' vs lmms-eval 'blue'" in problems
    assert compare(run, {"predictions": {"a": "yes"}, "metrics": run["metrics"]}, ())[0].startswith("rows differ")


@pytest.mark.slow
def test_lmms_eval_command_line_matches_vtc_eval(tmp_path) -> None:
    """The real ``python -m lmms_eval --model vtc`` against ``vtc eval``: same predictions, same scores."""
    env = dict(os.environ)
    env.setdefault("VTC_BASE_VENV", sys.prefix)  # the venv running this test is the one lmms-eval layers on
    argv = ["bash", str(ROOT / "scripts" / "lmms-check.sh"), "--rows", "12", "--work", str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["methods"]) == {"dense", "dart.r64"}
    for method, result in summary["methods"].items():
        assert result["match"] and result["rows"] == 12, (method, result["problems"])
        assert result["lmms_eval"]["accuracy"] == result["vtc"]["accuracy"]
    # Pruning changes some answers on these rows, so the two runs are not one run read twice.
    assert summary["methods"]["dart.r64"]["vtc"]["accuracy"] < summary["methods"]["dense"]["vtc"]["accuracy"]


def test_vtc_lmms_task_writes_the_task(tmp_path, capsys) -> None:
    from vtc.cli import main

    assert main(["lmms-task", str(tmp_path / "t"), "--rows", "3"]) == 0
    assert "--tasks vtc_shapesqa --include_path" in capsys.readouterr().out
    assert len(shapesqa.read_split(tmp_path / "t" / "data")) == 3 and (tmp_path / "t" / "vtc_shapesqa.yaml").is_file()
