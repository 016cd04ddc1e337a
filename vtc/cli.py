"""The ``vtc`` command line: ``vtc demo``, ``vtc flops``, ``vtc bench``, ``vtc eval``, ``vtc report``, ``vtc list``."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

PREFILL_COLUMNS = [
    ("spec", "method", "s"),
    ("visual_kept", "kept", "d"),
    ("tokens_per_layer", "tokens entering layers", "s"),
    ("dense_ms", "dense ms", ".1f"),
    ("oracle_ms", "oracle ms", ".1f"),
    ("vtc_ms", "vtc ms", ".1f"),
    ("oracle_speedup", "oracle x", ".2f"),
    ("vtc_speedup", "vtc x", ".2f"),
    ("vtc_over_oracle", "vtc/oracle", ".3f"),
    ("flops_ideal_decoder", "FLOPs-ideal x", ".2f"),
]


def _specs(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def environment() -> dict[str, str]:
    """Versions and device, recorded with every result row."""
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def append_rows(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Append result rows (with `meta` columns first) to a CSV file.

    The file keeps one header: when the rows bring columns it lacks, it is rewritten with the union of both
    (older rows get empty cells there), so a results file stays one table as the benchmark grows fields.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{**meta, **r} for r in rows]
    columns, old = list(records[0]), []
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            known, old = list(reader.fieldnames or []), list(reader)
        columns = known + [c for c in columns if c not in known]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows([*old, *records])


# -- vtc flops -----------------------------------------------------------------------------------------
def cmd_flops(args: argparse.Namespace) -> int:
    from vtc.measure import flops

    report = flops(
        args.model,
        _specs(args.method) or None,
        visual_tokens=args.visual_tokens,
        text_tokens=args.text_tokens,
        images=args.images,
        decode_steps=args.decode_steps,
        formula=args.formula,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    lines = report.table().splitlines()
    print(f"{args.model}, {args.method or 'dense'}: FLOPs by the '{args.formula}' formula (a multiply-add counts once)")
    print("\n".join(lines if args.per_layer else lines[-5:]))
    saved = f"{report.prefill_ratio:.1%} of dense ({report.prefill_saved:.1%} saved)"
    print(f"prefill FLOPs of the decoder layers: {saved}")
    return 0


# -- vtc bench -----------------------------------------------------------------------------------------
def bench_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a ``vtc bench`` run, from its parsed settings (no paths, no --out)."""
    return (
        f"python -m vtc bench {args.what} --methods {args.methods} --hidden {args.hidden} --layers {args.layers} "
        f"--text-tokens {args.text_tokens} --dtype {args.dtype} --device {args.device} --warmup {args.warmup} "
        f"--repeats {args.repeats} --threads {args.threads}"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from vtc.bench import format_rows, llava_like, llava_like_sample, prefill_benchmark, pruning_specs
    from vtc.eval.models import pick_device
    from vtc.progress import bar

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = llava_like(hidden=args.hidden, layers=args.layers, dtype=dtype).to(device)
    sample = llava_like_sample(model, text_tokens=args.text_tokens)
    n_tokens = sample["input_ids"].shape[1]
    specs = pruning_specs() if args.methods == "all" else _specs(args.methods)
    print(
        f"prefill of a LLaVA-1.5-shaped model: hidden {args.hidden}, {args.layers} layers, {n_tokens} tokens "
        f"(576 visual), {args.dtype} on {device}; median of {args.repeats} round-robin repeats"
    )
    with bar(0, "prefills", unit="prefill", enabled=not args.quiet) as shown:

        def progress(done: int, total: int) -> None:
            shown.total = total
            shown.update(1)

        rows = prefill_benchmark(model, sample, specs, warmup=args.warmup, repeats=args.repeats, progress=progress)
    print(format_rows(rows, PREFILL_COLUMNS))
    print(
        "oracle: replays each method's measured schedule (the same tokens gathered at the same layers, its "
        "pre-pass and cache trim) with no scoring; vtc/oracle = vtc's speedup / the oracle's (1.0 = no overhead)."
    )
    if args.out:
        env = environment()
        if device.type == "cpu":
            env["device"] = f"{env['device']} {torch.backends.cpu.get_cpu_capability()}"
        meta = {**env, "hidden": args.hidden, "layers": args.layers, "tokens": n_tokens, "dtype": args.dtype}
        meta["command"] = bench_command(args)
        append_rows(Path(args.out), rows, meta)
        print(f"rows appended to {args.out}")
    return 0


# -- vtc demo ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from vtc.demo import run

    if args.rows is None:
        args.rows = 64 if args.video else 30
    return run(args)


# -- vtc eval ------------------------------------------------------------------------------------------
def _data_sources(items: list[str], tasks: list[str]) -> dict[str, str]:
    """``--data`` values: ``TASK=PATH`` each, or one bare PATH when a single task runs."""
    out = {}
    for item in items:
        if "=" in item:
            name, path = item.split("=", 1)
            out[name.strip()] = path
        elif len(tasks) == 1:
            out[tasks[0]] = item
        else:
            raise ValueError(f"--data {item!r}: with several tasks write TASK=PATH.")
    return out


def _missing_data_is_a_user_error(fn):
    """A missing dataset, image or runs folder, an unreadable video, or a video task for an image-only model
    is the user's to fix: one line, exit 2, no traceback."""
    from vtc.errors import MissingCapabilityError, VideoError

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (FileNotFoundError, VideoError, MissingCapabilityError) as exc:
            print(f"vtc {args.command}: {exc}", file=sys.stderr)
            return 2

    return run


@_missing_data_is_a_user_error
def cmd_eval(args: argparse.Namespace) -> int:
    from vtc.eval import models
    from vtc.eval.data import load_docs
    from vtc.eval.report import markdown
    from vtc.eval.runner import check_modality, parse_methods, run_task
    from vtc.eval.tasks import get_task

    tasks = [get_task(t) for t in _specs(args.tasks)]
    methods = parse_methods(args.method)
    sources = _data_sources(args.data, [t.name for t in tasks])
    model, processor = models.load(args.model, device=args.device, dtype=args.dtype)
    for task in tasks:  # a video task an image model cannot take fails here, before any task runs
        check_modality(model, processor, task, args.video_as_images)
    out = Path(args.out) if args.out else Path("runs") / models.model_label(args.model)
    summaries = []
    for task in tasks:
        docs = load_docs(task, sources.get(task.name), split=args.split, media_root=args.media_root, limit=args.limit)
        for method in methods:
            summaries.append(
                run_task(
                    model, processor, task, docs, method, out, batch_size=args.batch_size, frames=args.frames,
                    fps=args.fps, short_videos=args.short_videos, video_as_images=args.video_as_images,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, model_name=args.model,
                    progress=not args.quiet,
                )
            )  # fmt: skip
    print(markdown(summaries), end="")
    print(f"predictions and run.json files in {out}")
    return 0


@_missing_data_is_a_user_error
def cmd_report(args: argparse.Namespace) -> int:
    from vtc.eval.report import collect, markdown, plot_accuracy_flops

    runs = collect(args.runs)
    table = markdown(runs)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
        print(f"table written to {args.out}")
    if args.plots:
        for path in plot_accuracy_flops(runs, args.plots):
            print(f"plot: {path}")
    return 0


def cmd_lmms_task(args: argparse.Namespace) -> int:
    from vtc.eval.lmms_task import TASK, export

    path = export(args.folder, rows=args.rows, split=args.split)
    print(f"wrote {path} and {args.rows} {args.split} rows; run it with")
    run = "lmms_eval --model vtc --model_args pretrained=reference,method=dense"
    print(f"  {run} --tasks {TASK} --include_path {args.folder}")
    return 0


def _task_names() -> str:
    from vtc.eval.tasks import TASKS

    return ", ".join(TASKS.names())


# -- vtc list ------------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    import vtc
    from vtc.adapters import ADAPTERS
    from vtc.method import get_method

    print("methods:")
    for name in vtc.list_methods():
        cls = get_method(name)
        print(f"  {name:<12} presets: {', '.join(f'{name}.{p}' for p in cls.presets)}")
    print("adapters (model types):")
    for name in vtc.list_adapters():
        print(f"  {name:<12} {', '.join(ADAPTERS.get(name).model_types)}")
    from vtc.eval.tasks import TASKS

    print("eval tasks (vtc eval --tasks):")
    for name in TASKS.names():
        task = TASKS.get(name)
        where = "generated on first use" if task.make_split else (task.hub[0] if task.hub else "--data PATH")
        print(f"  {name:<16} {task.modality:<6} {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtc", description="Visual-token compression for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the reference model on ShapesQA, dense and pruned: accuracy, FLOPs, time")
    p.add_argument("--methods", default="", help="comma-separated pruning methods (default: every registered one)")
    p.add_argument("--video", action="store_true", help="the video reference model on ShapesQA-Video clips instead")
    p.add_argument("--rows", type=int, default=None, help="held-out questions (default: 30, or 64 with --video)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per setting")
    p.add_argument("--model", default=None, help="a reference model folder (default: the one shipped with vtc)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("flops", help="analytic FLOPs of a known model, dense vs compressed")
    p.add_argument("model", help="a known model (e.g. llava-1.5-7b, qwen2-vl-7b)")
    p.add_argument("--method", default="", help="comma-separated method specs, e.g. dart.r128")
    p.add_argument("--visual-tokens", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=0)
    p.add_argument("--formula", choices=["paper", "gqa"], default="paper")
    p.add_argument("--per-layer", action="store_true", help="print every decoder layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("bench", help="prefill time: dense vs a slicing oracle vs vtc, side by side")
    p.add_argument("what", choices=["prefill"])
    p.add_argument(
        "--methods", default="all", help="comma-separated specs, or 'all': every pruning method at r192, r128, r64"
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="append result rows to this CSV file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="accuracy and cost of methods on benchmarks (resumable)")
    p.add_argument(
        "--model", required=True, help="a transformers VLM: hub name, local folder, or 'reference' (shipped with vtc)"
    )
    p.add_argument("--tasks", required=True, help=f"comma-separated tasks: {_task_names()}")
    p.add_argument("--method", default="dense", help="comma-separated runs, e.g. dense,dart.r64 ('+' composes)")
    p.add_argument(
        "--data", action="append", default=[],
        help="TASK=PATH (repeatable); default: the hub dataset, or for shapesqa a split generated on first use",
    )  # fmt: skip
    p.add_argument("--media-root", default=None, help="folder that relative image/video paths start from")
    p.add_argument("--split", default=None)
    p.add_argument("--out", default=None, help="runs folder (default runs/<model name>)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N questions per task")
    p.add_argument("--frames", type=int, default=8, help="frames per video (uniform; with --fps, the most taken)")
    p.add_argument("--fps", type=float, default=None, help="sample videos at this many frames per second instead")
    p.add_argument(
        "--short-videos", default="error", choices=["error", "all", "repeat"],
        help="a clip with fewer frames than asked: stop (default), keep the frames it has, or repeat frames",
    )  # fmt: skip
    p.add_argument(
        "--video-as-images", action="store_true",
        help="give an image-only model (LLaVA-1.5) a video's frames as separate images",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on a CPU")  # fmt: skip
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lmms-task", help="write ShapesQA as a local lmms-eval task (scored by vtc's scorer)")
    p.add_argument("folder", help="where the task YAML and its data go (lmms_eval --include_path FOLDER)")
    p.add_argument("--rows", type=int, default=100, help="ShapesQA questions to write")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.set_defaults(func=cmd_lmms_task)

    p = sub.add_parser("report", help="markdown table and plots from a runs folder")
    p.add_argument("runs", help="the folder `vtc eval --out` wrote")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--plots", default=None, help="write accuracy-vs-FLOPs plots to this folder (needs matplotlib)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("list", help="registered methods, presets and adapters")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vtc.errors import VTCError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VTCError, ValueError) as exc:  # a user error: say it in one line, no traceback
        print(f"vtc {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
