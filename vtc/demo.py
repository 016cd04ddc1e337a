"""``vtc demo``: vtc's main job on the embedded default, the reference model on ShapesQA.

It loads the reference LLaVA that ships with vtc for it (trained on ShapesQA-hard: 576 visual tokens per
image, LLaVA-1.5's count, so the papers' budgets of 192 / 128 / 64 apply as stated), writes a held-out split
of the variant the model was trained on, answers it dense and with every registered pruning method at three
budgets, and prints one table: accuracy, accuracy relative to dense, prefill FLOPs, prefill time and tokens kept.
``vtc demo --video`` does the same with the video reference model (a LLaVA-OneVision trained on
ShapesQA-Video, 129 visual tokens per 8-frame clip) on held-out ShapesQA-Video questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

#: Visual tokens kept, as fractions of the image's tokens: the papers' 192 / 128 / 64 of 576.
BUDGETS = (192 / 576, 128 / 576, 64 / 576)


def pruning_methods() -> list[str]:
    """Registered methods that drop visual tokens (decoding methods and attention edits are left out)."""
    import vtc
    from vtc.method import get_method

    return [m for m in vtc.list_methods() if get_method(m).prunes]


#: Prompts in a timed prefill: 8 images (4,608 visual tokens) or 8 clips (1,032) time a prefill as well as 16
#: and keep the demo near two minutes (the tower runs on every image and frame of every timed prefill).
TIMING_PROMPTS = 8
#: Prompts the merge thresholds are calibrated on (`calibrate`): about 8 prefills per merging setting, so few
#: prompts keep the demo under two minutes; the table still prints FLOPs measured on the timing batch.
CALIBRATION_PROMPTS = 2

#: Methods are compared at matched prefill FLOPs: a budget's target is the FLOPs of `ANCHOR` keeping that many
#: visual tokens (from its layer 2 on), and each method gets the `keep` whose planned FLOPs come nearest.
ANCHOR = "dart"
#: Rows of one budget must lie within this many points of prefill FLOPs of the target.
TOLERANCE = 0.10
#: Data-dependent stages left out of the plan: their window merges only remove tokens, so the plan is an
#: upper bound on the FLOPs, and `calibrate` sets how much they merge from FLOPs measured on real inputs.
UNPLANNED = {"mustdrop": {"merge": "off"}, "focusllava": {"vision_sampler": None}}
#: The threshold that sets how much each unplanned merge merges (a window merges at or above it; 1.0 merges
#: only windows of identical tokens).
MERGE_KNOBS = {"mustdrop": "merge_threshold", "focusllava": "redundancy"}
#: `calibrate` stops once the measured FLOPs lie within this much below the target.
CALIBRATION = 0.02


@dataclasses.dataclass(frozen=True)
class Setting:
    """A method's setting at one budget: its config, the budget's FLOPs target and its planned FLOPs."""

    config: Any
    budget: str  # the budget as the papers state it, e.g. "64/576"
    target: float  # prefill FLOPs relative to dense that the budget stands for
    planned: float  # the config's planned prefill FLOPs relative to dense
    matched: bool  # within TOLERANCE of the target (False: a pre-pass method, or the target is unreachable)
    prepass: bool = False  # the method runs a pre-pass first (GemFilter): it keeps the budget's count instead
    measured: float | None = None  # prefill FLOPs relative to dense measured on real inputs (`calibrate`)

    @property
    def note(self) -> str:
        """What the row's label adds when the row stands outside the matched-FLOPs rule."""
        if self.prepass:
            return " (pre-pass: at the budget's count)"
        return "" if self.matched else " (unmatched: cannot reach the budget's FLOPs)"


def planned_ratio(dims: Any, config: Any, n_visual: int, text_tokens: int) -> float:
    """Planned prefill FLOPs of `config` relative to dense, for one prompt of that many tokens."""
    from vtc.measure import flops

    config = dataclasses.replace(config, **UNPLANNED.get(config.method, {}))
    return flops(dims, config, visual_tokens=n_visual, text_tokens=text_tokens).prefill_ratio


def at_budget(method: str, fraction: float, n_visual: int, dims: Any, text_tokens: int) -> Setting:
    """``method`` at the prefill FLOPs of keeping ``fraction`` of ``n_visual`` visual tokens (see `ANCHOR`).

    Every pruner takes ``keep=N``; the N whose planned FLOPs are nearest the target is chosen (ties: the
    N nearest the budget's count). When no N comes within `TOLERANCE`, the method keeps the budget's count
    and the setting says it is unmatched.

    A method with a pre-pass (GemFilter) keeps the budget's count and stands outside the rule: its pre-pass
    through the first layers is paid before any token goes, so matching its FLOPs to a method that prunes
    from layer 2 leaves it a fraction of the tokens (on the 4-layer reference model, 19 of 144 at 48's
    FLOPs); at the budget's count it shows what its selection is worth, and its FLOPs are printed as measured.
    """
    from vtc.config import resolve
    from vtc.method import Method, get_method

    keep = round(fraction * n_visual)
    target = planned_ratio(dims, resolve(ANCHOR, keep=keep), n_visual, text_tokens)
    budget = f"{round(fraction * 576)}/576"
    if get_method(method).prepass_layer is not Method.prepass_layer:
        config = resolve(method, keep=keep)
        ratio = planned_ratio(dims, config, n_visual, text_tokens)
        return Setting(config, budget, target, ratio, abs(ratio - target) <= TOLERANCE, prepass=True)
    best: tuple[tuple[float, int], Any, float] | None = None

    def consider(k: int) -> None:
        nonlocal best
        try:
            config = resolve(method, keep=k)
        except ValueError:  # below the method's floor (DART's pivots)
            return
        ratio = planned_ratio(dims, config, n_visual, text_tokens)
        if best is None or (abs(ratio - target), abs(k - keep)) < best[0]:
            best = ((abs(ratio - target), abs(k - keep)), config, ratio)

    # Every `stride`-th count, then every count around the best: planned FLOPs move smoothly with the count.
    stride = -(-n_visual // 144)
    for k in range(0, n_visual + 1, stride):
        consider(k)
    if best is not None and stride > 1:
        centre = best[1].keep
        for k in range(max(0, centre - stride + 1), min(n_visual, centre + stride - 1) + 1):
            consider(k)
    (gap, _), config, ratio = best
    matched = gap <= TOLERANCE
    if not matched:
        config = resolve(method, keep=keep)
        ratio = planned_ratio(dims, config, n_visual, text_tokens)
    return Setting(config, budget, target, ratio, matched)


def calibrate(setting: Setting, measure: Callable[[Any], float], steps: int = 5) -> Setting:
    """`setting` with its merges cut back until its measured prefill FLOPs reach the budget's.

    The plan leaves MustDrop's and FocusLLaVA's window merges out (`UNPLANNED`): on images whose background is
    one colour they merge most of it, so a keep chosen by the plan costs far less than the budget (FocusLLaVA
    at 192 of 576 on ShapesQA-hard: 26% of dense against DART's 64%), and no keep can raise it, since the
    merges come first. Their threshold (`MERGE_KNOBS`) is raised from the method's default by bisection
    (`steps` halvings) to the lowest value, so the most merging, whose measured FLOPs come within
    `CALIBRATION` below the target; 1.0 when none does, and the setting is then unmatched. `measure(config)`
    gives a config's prefill FLOPs relative to dense, measured on real inputs.

    Other settings come back unchanged: their planned FLOPs are what they cost.
    """
    config = setting.config
    knob = MERGE_KNOBS.get(config.method)
    if knob is None:
        return setting
    seen: dict[float, float] = {}

    def at(threshold: float) -> float:
        if threshold not in seen:
            seen[threshold] = measure(dataclasses.replace(config, **{knob: threshold}))
        return seen[threshold]

    low, high = getattr(config, knob), 1.0
    enough = setting.target - CALIBRATION
    if at(low) >= enough:
        high = low
    elif at(high) >= enough:
        for _ in range(steps):
            middle = round((low + high) / 2, 4)
            low, high = (low, middle) if at(middle) >= enough else (middle, high)
    config = dataclasses.replace(config, **{knob: high})
    return dataclasses.replace(setting, config=config, matched=abs(at(high) - setting.target) <= TOLERANCE,
                               measured=at(high))  # fmt: skip


def measured_ratio(model: Any, config: Any, batch: dict[str, Any]) -> float:
    """Prefill FLOPs of `config` relative to dense, measured on one prefill of `batch`."""
    import vtc

    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**batch, logits_to_keep=1)
        return handle.stats.flops.prefill_ratio


def settings_for(model: Any, methods: list[str], n_visual: int, batch: dict[str, Any]) -> list[Setting]:
    """Every method at every budget of `BUDGETS`: picked by plan (`at_budget`), then calibrated on `batch`."""
    from vtc.adapters import adapter_for

    text_tokens = round(float(batch["attention_mask"].sum(dim=1).double().mean()) - n_visual)
    dims = adapter_for(model).dims()

    def measure(config: Any) -> float:
        return measured_ratio(model, config, batch)

    return [calibrate(at_budget(m.strip(), f, n_visual, dims, text_tokens), measure) for f in BUDGETS for m in methods]


def answer_and_measure(
    model: Any, config: Any, answer: Callable[[], list[str]], batch: dict[str, Any]
) -> tuple[list[str], Any]:
    """`answer()` with `config` applied (None: dense), then one prefill of `batch` for its stats.

    Returns the predictions and the prefill's ``vtc.state.TokenStats`` (FLOPs, visual tokens per layer).
    """
    import vtc

    with vtc.apply(model, config if config is not None else "dart.noop") as handle:
        predictions = answer()
        with torch.no_grad():
            model(**batch, logits_to_keep=1)
        return predictions, handle.stats


def row_name(setting: Setting | None) -> str:
    """A table row's name: ``dense``, or the budget, the method's label and the setting's note."""
    return "dense" if setting is None else f"{setting.budget} {label(setting.config)}{setting.note}"


def label(config: Any) -> str:
    """The method and its budget (``dart keep=64``), with a merge threshold that is not the method's default."""
    settings = config.to_dict()
    knob = MERGE_KNOBS.get(config.method)
    extra = ""
    if knob is not None and settings[knob] != next(f.default for f in dataclasses.fields(config) if f.name == knob):
        extra = f" {knob}={settings[knob]:.4g}"
    for key in ("keep", "keep_ratio", "global_threshold"):
        if settings.get(key) is not None:
            value = settings[key]
            shown = f"{value:.3g}" if isinstance(value, float) else value
            return f"{config.method} {key}={shown}{extra}"
    return config.method + extra


@dataclasses.dataclass
class Bench:
    """What the comparison needs of a demo's data: how to answer and score its rows, and one batch to time.

    Attributes:
        answer: rows -> greedy predictions, through whatever model is wrapped at the time.
        score: (rows, predictions) -> metrics with ``accuracy`` and ``acc_<type>``.
        types: the question types shown as columns.
        timing_batch: one batch of the model's inputs, prefilled to time each setting.
        calibration_batch: the inputs `calibrate` measures merges on (None: the timing batch).
    """

    answer: Callable[[list[dict]], list[str]]
    score: Callable[[list[dict], list[str]], dict[str, float]]
    types: tuple[str, ...]
    timing_batch: dict[str, Any]
    calibration_batch: dict[str, Any] | None = None


def compare(model: Any, n_visual: int, rows: list[dict], bench: Bench, args: argparse.Namespace) -> str:
    """Answer `rows` dense and with every pruning method at the three matched budgets; the table, as text."""
    import vtc
    from vtc.bench import format_rows, nothing, time_round_robin
    from vtc.progress import bar

    methods = args.methods.split(",") if args.methods else pruning_methods()
    timing_batch = bench.timing_batch
    calibration_batch = timing_batch if bench.calibration_batch is None else bench.calibration_batch
    settings = [None, *settings_for(model, methods, n_visual, calibration_batch)]
    results, providers = [], {}
    shown = bar(len(settings) * len(rows), "answering", unit="q", enabled=not getattr(args, "quiet", False))
    for setting in settings:
        config = None if setting is None else setting.config
        name = row_name(setting)
        preds, stats = answer_and_measure(model, config, lambda: bench.answer(rows), timing_batch)
        kept = [sum(row) / len(row) for row in stats.visual_per_layer]
        target = 1.0 if setting is None else setting.target
        results.append((name, bench.score(rows, preds), stats.flops, target, kept[-1], sum(kept) / len(kept)))

        def prefill(batch=timing_batch) -> None:
            with torch.no_grad():
                model(**batch, logits_to_keep=1)

        setup = nothing if config is None else (lambda c=config: vtc.apply(model, c))
        providers[name] = (prefill, setup)
        shown.update(len(rows))
    shown.close()
    timings = time_round_robin(providers, torch.device("cpu"), warmup=1, repeats=args.repeats)

    dense = results[0][1]
    table = []
    for name, metrics, flops, target, last, average in results:
        table.append(
            {
                "method": name,
                "acc": metrics["accuracy"],
                "rel": metrics["accuracy"] / max(dense["accuracy"], 1e-9),
                **{t: metrics.get(f"acc_{t}", float("nan")) for t in bench.types},
                "flops": flops.prefill_ratio,
                "target": target,
                "ms": timings[name].median_ms,
                "speedup": timings["dense"].median_ms / timings[name].median_ms,
                "last": last,
                "avg": average,
            }
        )
    columns = [
        ("method", "method", "s"),
        ("acc", "accuracy", ".1%"),
        ("rel", "vs dense", ".1%"),
        *[(t, t, ".0%") for t in bench.types],
        ("flops", "prefill FLOPs", ".1%"),
        ("target", "budget's", ".1%"),
        ("ms", "prefill ms", ".1f"),
        ("speedup", "speedup", ".2f"),
        ("last", "visual kept", ".1f"),
        ("avg", "layer avg", ".1f"),
    ]
    return format_rows(table, columns)


def footnote(n_visual: int, prompts: int, repeats: int) -> str:
    """What the table's columns mean (shared by the image and the video demo)."""
    return (
        f"Prefill FLOPs: decoder, papers' formula, relative to dense, measured; budget's: the FLOPs of {ANCHOR} "
        f"keeping the budget's share of the visual tokens, which every method's keep is chosen to match (within "
        f"{TOLERANCE:.0%} points, measured; MustDrop's and FocusLLaVA's merge thresholds are raised as far as "
        f"needed to reach it; a row marked unmatched cannot reach it, and a pre-pass method keeps the budget's "
        f"count: its pre-pass is paid before any token goes). Time: median of {repeats} "
        f"prefills of {prompts} prompts. Visual kept: tokens entering the last layer (of {n_visual}); layer avg: "
        f"averaged over layers."
    )


def run(args: argparse.Namespace) -> int:
    """Answer a ShapesQA split (or, with ``--video``, a ShapesQA-Video one) dense and pruned; print the table."""
    if getattr(args, "video", False):
        return run_video(args)
    from vtc.eval import shapesqa
    from vtc.reference import evaluate
    from vtc.reference import model as reference

    started = time.perf_counter()
    torch.manual_seed(0)
    model, processor = reference.load(args.model or reference.HARD_WEIGHTS)
    geometry = reference.variant_of(model)
    n_visual = model.config.image_seq_length
    n_settings = 1 + len(BUDGETS) * len(args.methods.split(",") if args.methods else pruning_methods())
    with tempfile.TemporaryDirectory() as root:
        shapesqa.write_split(root, "test", args.rows, geometry)
        rows = shapesqa.read_split(root, "test")
        print(
            f"vtc demo: the reference LLaVA ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
            f"{n_visual} visual tokens per image) on {len(rows)} held-out {geometry.name} questions, "
            f"dense and {n_settings - 1} pruned settings at matched prefill FLOPs."
        )
        bench = Bench(
            answer=lambda batch: evaluate.predict(model, processor, batch, root, batch_size=args.batch_size),
            score=shapesqa.score,
            types=shapesqa.TYPES,
            timing_batch=evaluate.inputs_for(processor, rows[: min(args.batch_size, TIMING_PROMPTS)], root),
            calibration_batch=evaluate.inputs_for(processor, rows[:CALIBRATION_PROMPTS], root),
        )
        table = compare(model, n_visual, rows, bench, args)
    print(table)
    print(
        "Accuracy: greedy answers to the four question types, exact match; describe: the description names "
        f"exactly the scene's objects. {footnote(n_visual, len(bench.timing_batch['input_ids']), args.repeats)} "
        f"{time.perf_counter() - started:.0f} s."
    )
    return 0


def run_video(args: argparse.Namespace) -> int:
    """The video reference model (LLaVA-OneVision) on held-out ShapesQA-Video clips, dense and pruned."""
    from vtc.eval import shapesqa_video
    from vtc.reference.video import model as reference
    from vtc.reference.video.train import predict

    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = reference.load(args.model)
    n_visual = reference.video_tokens()
    rows, clips = [], {}
    for row, clip in shapesqa_video.split_rows("test", args.rows):  # drawn in memory: the split's videos are lossless
        rows.append(row)
        clips[row["id"]] = shapesqa_video.render(clip)
    n_settings = 1 + len(BUDGETS) * len(args.methods.split(",") if args.methods else pruning_methods())
    print(
        f"vtc demo --video: the video reference LLaVA-OneVision ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}"
        f" M parameters, {n_visual} visual tokens per {reference.FRAMES}-frame clip) on {len(rows)} held-out "
        f"ShapesQA-Video questions, dense and {n_settings - 1} pruned settings at matched prefill FLOPs."
    )

    def answer(batch: list[dict]) -> list[str]:
        questions, frames = [r["question"] for r in batch], [clips[r["id"]] for r in batch]
        return predict(model, tokenizer, questions, frames, batch_size=args.batch_size)

    head = rows[: min(args.batch_size, TIMING_PROMPTS)]
    timing_batch = reference.video_inputs(
        tokenizer, [clips[r["id"]] for r in head], [reference.prompt(r["question"]) for r in head]
    )
    bench = Bench(answer, shapesqa_video.score, shapesqa_video.TYPES, timing_batch)
    print(compare(model, n_visual, rows, bench, args))
    print(
        "Accuracy: greedy one-word answers, exact match: the colour of the shape that appears first (order), "
        "which way a shape moves (direction), how many shapes appear (count), whether a shape is there at the end "
        "(end). "
        f"{footnote(n_visual, len(timing_batch['input_ids']), args.repeats)} {time.perf_counter() - started:.0f} s."
    )
    return 0
