"""`vtc report`'s pieces: the Pareto front and the accuracy-vs-FLOPs plot."""

from __future__ import annotations

import random

import pytest

from vtc.eval.models import model_label
from vtc.eval.report import accuracy_flops_figure, pareto_front, plot_accuracy_flops, rows


def dominated(p, q) -> bool:
    """Whether q beats p: no more cost, no less score, one strictly better."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


def test_pareto_front_by_hand() -> None:
    points = [(100, 0.9), (50, 0.85), (60, 0.80), (30, 0.5), (30, 0.6), (80, 0.9)]
    assert pareto_front(points) == [4, 1, 5]  # (30, .6), (50, .85), (80, .9): (100, .9) costs more for the same


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_is_exactly_the_undominated_points(seed) -> None:
    rng = random.Random(seed)
    points = [(rng.randint(0, 20), rng.randint(0, 20) / 20) for _ in range(40)]
    front = pareto_front(points)
    undominated = {i for i, p in enumerate(points) if not any(dominated(p, q) for j, q in enumerate(points) if j != i)}
    # ties (equal points) keep one representative
    assert {points[i] for i in front} == {points[i] for i in undominated}
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def run(method: str, score: float, flops: float, ratio: float) -> dict:
    return {
        "model": "/somewhere/vtc/reference/weights", "task": "shapesqa", "method": method, "primary": "accuracy",
        "metrics": {"accuracy": score},
        "efficiency": {"prefill_flops": flops, "flops_ratio": ratio, "prefill_ms": 10.0, "samples": 4},
    }  # fmt: skip


def test_plot_names_the_model_and_task(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    runs = [run("dense", 1.0, 100.0, 1.0), run("dart.r64", 0.9, 30.0, 0.3), run("random.r64", 0.8, 30.0, 0.3)]
    paths = plot_accuracy_flops(runs, tmp_path)
    assert [p.name for p in paths] == ["reference_shapesqa_accuracy_flops.png"]
    assert paths[0].stat().st_size > 1000
    assert model_label("llava-hf/llava-1.5-7b-hf") == "llava-1.5-7b-hf" and model_label("reference") == "reference"


def test_the_title_and_legend_stay_inside_the_figure() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.text import Text

    names = [f"{k}/576 mustdrop keep={k + 53} merge_threshold=0.9187 (a long label)" for k in (64, 128, 192)] * 6
    runs = [run("dense", 0.9, 100.0, 1.0)] + [run(n, 0.8, 50.0, 0.5) for n in names]
    items = rows(runs)
    fig = accuracy_flops_figure(items[0]["model"], items[0]["task"], items)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    ax = fig.axes[0]
    title = fig.findobj(lambda a: isinstance(a, Text) and a.get_text() == fig.get_suptitle())[0]
    for artist in (title, ax.get_legend(), ax.xaxis.label, ax.yaxis.label):
        extent = artist.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 + 0.5, artist
        assert box.y0 <= extent.y0 and extent.y1 <= box.y1 + 0.5, artist
    plt.close(fig)
