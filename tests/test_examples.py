"""Every script in examples/ runs as a user runs it (a subprocess, in an empty folder) and prints what it claims.

Each example has one entry in ``CASES``: the arguments it runs with (kept small) and a check of its
output; a script added to examples/ without an entry fails ``test_every_example_has_a_case``. A script
spends most of its time importing transformers, so the selected examples start together, two at a time
(one torch thread each), when the first of them is tested; each test then waits for its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if "--image" in args:  # a user's image file: a ShapesQA scene saved as PNG
        from vtc.eval import shapesqa

        _, scene = next(shapesqa.split_rows("val", 1))
        shapesqa.render(scene).save(cwd / "scene.png")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    command = [sys.executable, str(EXAMPLES / name), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def table_rows(out: str, names: list[str]) -> dict[str, list[str]]:
    """The whitespace-split rows of a printed table whose first cell is one of `names`."""
    return {cells[0]: cells for line in out.splitlines() if (cells := line.split()) and cells[0] in names}


def percent(cell: str) -> float:
    return float(cell.rstrip("%"))


# -- checks, one per example -------------------------------------------------------------------------------------
def check_wrap_and_generate(out: str, cwd: Path) -> None:
    answers = re.findall(r"^Q: .+  A: (.*)  \(expected: (.+)\)$", out, re.M)
    assert len(answers) == 2 and all(a for a, _ in answers), out
    assert "stage dart@2: visual [144, 144] -> [16, 16]" in out  # the reference LLaVA, both rows pruned
    assert "Handle(LlavaForConditionalGeneration, [dart], removed)" in out
    assert "stage dart@2: visual [256, 256] -> [16, 16]" in out  # the tiny Qwen2-VL, same call
    ids = re.search(r"Qwen2-VL new token ids: (\[\[.*\]\])", out)
    assert ids and [len(row) for row in json.loads(ids.group(1))] == [4, 4]  # two rows, 4 new tokens each


def check_compare_methods(out: str, cwd: Path) -> None:
    rows = table_rows(out, ["dense", "dart", "random"])
    assert set(rows) == {"dense", "dart", "random"}, out
    assert rows["dense"][1] == "144" and rows["dense"][3] == "100.0%"
    for name in ("dart", "random"):
        assert int(rows[name][1]) == 16 and percent(rows[name][3]) < 100, rows[name]
        png = cwd / "kept_patches" / f"{name}.png"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (384, 384)
            assert image.convert("L").getextrema()[0] < 60  # dropped patches are drawn dark


def check_eval_local_folder(out: str, cwd: Path) -> None:
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| shapesqa |")]
    cells = {r[1].strip(): [c.strip() for c in r] for r in rows}
    assert set(cells) == {"dense", "dart.r64"}, out
    assert cells["dense"][6] == "100.0%" and cells["dense"][9] == cells["dart.r64"][9] == "4"  # FLOPs ratio, n
    assert float(cells["dart.r64"][7]) < float(cells["dense"][7])  # visual kept
    assert percent(cells["dart.r64"][6]) < 100
    assert (cwd / "eval_out" / "runs" / "shapesqa" / "dart.r64" / "run.json").is_file()


def check_video_qa(out: str, cwd: Path) -> None:
    assert re.search(r"^video tokens: 144 \(4 temporal patches of 6x6\) -> 48$", out, re.M), out
    per_frame = re.search(r"kept per temporal patch: \[(.*)\]", out)
    assert per_frame and sum(int(n) for n in per_frame.group(1).split(",")) == 48
    assert "stage dart@2: visual [144] -> [48]" in out
    if "PyAV is not installed" not in out:
        assert (cwd / "synthetic_clip.mp4").stat().st_size > 0


def check_flops_by_name(out: str, cwd: Path) -> None:
    rows = table_rows(out, ["dense", "dart.r128", "dart.r64", "mustdrop.r64"])
    assert rows["dense"][2] == "100.0%"
    assert rows["dart.r64"][2] == "25.2%" and rows["dart.r128"][2] == "34.5%"  # the figures the README quotes
    assert float(rows["dart.r64"][1]) < float(rows["dense"][1])
    assert rows["mustdrop.r64"][1] == "-" and "data-dependent" in out


def check_compose(out: str, cwd: Path) -> None:
    assert re.search(r"^dense: \w+", out, re.M) and re.search(r"^dart\.r64 \+ deco: \w+", out, re.M), out
    assert "stage dart@2: visual [144] -> [68]" in out
    assert "refused as expected: deco and dropout_decoding" in out


CASES = {
    "wrap_and_generate.py": (["--keep", "16"], check_wrap_and_generate),
    "compare_methods.py": (["--image", "scene.png", "--methods", "dart,random", "--keep", "16"], check_compare_methods),
    "eval_local_folder.py": (["--rows", "4", "--batch-size", "4"], check_eval_local_folder),
    "video_qa.py": ([], check_video_qa),
    "flops_by_name.py": (["--methods", "dart.r128,dart.r64,mustdrop.r64"], check_flops_by_name),
    "compose.py": ([], check_compose),
}


def test_every_example_has_a_case() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(CASES), f"examples without a test: {scripts - set(CASES)}; tests without a script: " + str(
        set(CASES) - scripts
    )


@pytest.fixture(scope="module")
def started(request, tmp_path_factory) -> dict[str, tuple[Future, Path]]:
    """The examples this session tests, started two at a time: name -> (its run, its folder)."""
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_example_runs"
    ]
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {}
    for name in selected:
        cwd = tmp_path_factory.mktemp(name.removesuffix(".py"))
        runs[name] = (pool.submit(run_example, name, CASES[name][0], cwd), cwd)
    yield runs
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name: str, started) -> None:
    future, cwd = started[name]
    done = future.result()
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    CASES[name][1](done.stdout, cwd)
