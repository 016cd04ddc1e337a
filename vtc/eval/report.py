"""Reports: runs -> a markdown table (accuracy, relative to dense, FLOPs, speedup) and plots.

``collect`` reads every ``run.json`` under a runs folder. The table has one row per (task, method):
the task's primary metric, that metric relative to the dense run of the same task and model, the mean
prefill FLOPs of the decoder layers per sample (the papers' formula) and their ratio to dense, the
visual tokens kept (averaged over layers), and the prefill speedup over dense (same batch size and
device assumed: the runs record both, compare them before trusting a speedup).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vtc.eval.models import model_label
from vtc.eval.runner import DENSE


def collect(root: str | Path) -> list[dict[str, Any]]:
    """The summaries of all runs under `root` (each ``<task>/<method>/run.json``)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no runs folder at {root}.")
    runs = [json.loads(p.read_text()) for p in sorted(root.rglob("run.json"))]
    if not runs:
        raise FileNotFoundError(f"{root} holds no run.json files; run `vtc eval --out {root}` first.")
    return runs


def rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run with its comparisons to the dense run of the same model and task."""
    dense = {(r["model"], r["task"]): r for r in runs if r["method"] == DENSE}
    out = []
    for r in sorted(runs, key=lambda r: (r["model"], r["task"], r["method"] != DENSE, r["method"])):
        primary = r["primary"]
        score = r["metrics"].get(primary)
        eff = r["efficiency"]
        base = dense.get((r["model"], r["task"]))
        row = {
            "model": r["model"],
            "task": r["task"],
            "method": r["method"],
            "metric": primary,
            "score": score,
            "relative": None,
            "flops": eff.get("prefill_flops"),
            "flops_ratio": eff.get("flops_ratio"),
            "visual_kept": eff.get("visual_kept"),
            "prefill_ms": eff.get("prefill_ms"),
            "speedup": None,
            "samples": eff.get("samples"),
        }
        if base is not None:
            b_score = base["metrics"].get(primary)
            if b_score:
                row["relative"] = score / b_score
            if eff.get("prefill_ms"):
                row["speedup"] = base["efficiency"]["prefill_ms"] / eff["prefill_ms"]
        out.append(row)
    return out


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """The comparison table as GitHub markdown, one section per model."""
    lines: list[str] = []
    model = None
    for r in rows(runs):
        if r["model"] != model:
            model = r["model"]
            lines += [
                f"### {model}",
                "",
                "| task | method | metric | score | vs dense | prefill FLOPs | FLOPs vs dense | visual kept | "
                "prefill speedup | n |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
        lines.append(
            f"| {r['task']} | {r['method']} | {r['metric']} | {_fmt(r['score'], '.4g')} | "
            f"{_fmt(r['relative'], '.1%')} | {_fmt(r['flops'], '.3g')} | {_fmt(r['flops_ratio'], '.1%')} | "
            f"{_fmt(r['visual_kept'], '.1f')} | {_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | "
            f"{_fmt(r['samples'], 'd')} |"
        )
    lines.append("")
    lines.append(
        "FLOPs: decoder-layer prefill per sample, 4nd² + 2n²d + 3ndm (one multiply-add = one FLOP), as the "
        "papers report. Speedup: dense prefill time / the method's, same device and batch size."
    )
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has at most their cost and at least their
    score with one of the two strictly better. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_accuracy_flops(runs: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per (model, task) (:func:`accuracy_flops_figure`), named after both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows(runs):
        if r["flops"] is not None and r["score"] is not None:
            groups.setdefault((r["model"], r["task"]), []).append(r)
    paths = []
    for (model, task), items in groups.items():
        fig = accuracy_flops_figure(model, task, items)
        path = out_dir / f"{model_label(model)}_{task}_accuracy_flops.png".replace("/", "_")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def accuracy_flops_figure(model: str, task: str, items: Sequence[dict[str, Any]]):
    """The primary metric against prefill FLOPs (% of dense when a dense run exists) for the `rows` of one
    model and task: every method a point in its own colour and marker, named in a legend beside the axes
    (names written at the points overlap), and the Pareto front drawn as a dashed step line. The layout is
    constrained, so the title and the legend stay inside the figure however long the names are."""
    import matplotlib.pyplot as plt

    markers = "os^Dvp<>hX"  # colours cycle fastest, so (colour, marker) is unique up to 100 settings
    relative = all(r["flops_ratio"] is not None for r in items)
    xs = [100 * r["flops_ratio"] if relative else r["flops"] for r in items]
    ys = [r["score"] for r in items]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(items):
        dense = r["method"] == DENSE
        ax.scatter(
            xs[i], ys[i], s=110 if dense else 45, marker="*" if dense else markers[(i // 10) % len(markers)],
            color="black" if dense else cmap(i % 10), label=r["method"], zorder=3,
        )  # fmt: skip
    front = pareto_front(list(zip(xs, ys, strict=True)))
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", ls="--", lw=1, color="grey",
            label="Pareto front", zorder=2)  # fmt: skip
    ax.set_xlabel("prefill FLOPs, % of dense (decoder layers)" if relative else "prefill FLOPs per sample")
    ax.set_ylabel(items[0]["metric"])
    fig.suptitle(f"{task}: {items[0]['metric']} against prefill FLOPs ({model_label(model)})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return fig


def plot_kept_patches(image: Any, kept: Sequence[int], grid: tuple[int, int], path: str | Path) -> Path:
    """Draw an image with the patches a method dropped greyed out.

    Args:
        image: a PIL image (as the model saw it, or the original: the grid is stretched over it).
        kept: patch indices kept, in raster order (``handle.stats.kept_visual()[row]``).
        grid: (rows, columns) of the patch grid.
        path: where to write the PNG.
    """
    from PIL import Image, ImageDraw

    rows_, cols = grid
    base = image.convert("RGB")
    w, h = base.size
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    keep = {int(k) for k in kept}
    for idx in range(rows_ * cols):
        if idx in keep:
            continue
        r, c = divmod(idx, cols)
        box = (c * w / cols, r * h / rows_, (c + 1) * w / cols, (r + 1) * h / rows_)
        draw.rectangle(box, fill=(40, 40, 40, 190))
    out = Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
