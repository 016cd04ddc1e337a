"""Timing harness and the LLaVA-shaped models that ``vtc demo``, ``vtc bench`` and benchmarks/ use.

Times come from CUDA events on a GPU and from the wall clock on a CPU, always after warm-up and as
medians. Providers are timed round-robin (one call each, repeated), so drift on a shared machine hits
all of them alike and their ratios stay meaningful.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc.oracle import Schedule, SliceOracle, renumbering_methods

if TYPE_CHECKING:
    pass

# LLaVA-1.5 (Vicuna-7B + CLIP ViT-L/14-336) proportions: head dim 128, FFN 11008/4096, 576 visual tokens,
# a prompt of 35 tokens before the image (system + "USER:") with the vicuna_v1 template.
HEAD_DIM, FFN_RATIO, VOCAB, IMAGE_SIZE, PATCH, PREFIX = 128, 11008 / 4096, 32064, 336, 14, 35


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds of repeated calls: median and spread."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread_ms(self) -> tuple[float, float]:
        """The 10th and 90th percentiles."""
        if len(self.samples_ms) < 2:
            return self.samples_ms[0], self.samples_ms[0]
        cuts = statistics.quantiles(self.samples_ms, n=10, method="inclusive")
        return cuts[0], cuts[-1]


def _clock(fn: Callable[[], Any], device: torch.device) -> float:
    """One call's milliseconds (CUDA events on a GPU, the wall clock elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_round_robin(
    providers: dict[str, tuple[Callable[[], Any], Callable[[], contextlib.AbstractContextManager]]],
    device: torch.device,
    warmup: int = 2,
    repeats: int = 7,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Timing]:
    """Time several providers side by side.

    Args:
        providers: name -> (call, setup), where ``setup()`` returns a context manager active around the
            call (wrapping a model, say) and is not timed.
        device: where the calls run.
        warmup: untimed rounds first.
        repeats: timed rounds; each round calls every provider once.
        progress: called with (calls done, calls in all) after each call; a long run on a busy machine
            otherwise gives no sign of life.
    """
    samples: dict[str, list[float]] = {name: [] for name in providers}
    total, done = (warmup + repeats) * len(providers), 0
    for round_ in range(warmup + repeats):
        for name, (call, setup) in providers.items():
            with setup():
                ms = _clock(call, device)
            if round_ >= warmup:
                samples[name].append(ms)
            done += 1
            if progress is not None:
                progress(done, total)
    return {name: Timing(tuple(v)) for name, v in samples.items()}


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak GPU memory of one call in MiB (None on a CPU, where torch keeps no such counter)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def llava_like(
    *,
    hidden: int = 512,
    layers: int = 32,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A random ``LlavaForConditionalGeneration`` with LLaVA-1.5's layer shapes at a smaller width.

    The decoder keeps LLaVA-1.5-7B's depth, head size, FFN ratio and vocabulary, and the image gives the
    same 576 visual tokens; only the width (and a small vision tower, whose cost is the same with and
    without pruning) is scaled down so a prefill fits a CPU.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if hidden % HEAD_DIM:
        raise ValueError(f"hidden must be a multiple of the head size {HEAD_DIM}; got {hidden}.")
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden // 64), projection_dim=vision_hidden,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=round(hidden * FFN_RATIO), num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM, num_key_value_heads=hidden // HEAD_DIM,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=VOCAB - 1,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def llava_like_sample(model: nn.Module, *, text_tokens: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt laid out as LLaVA-1.5's: 35 prefix tokens, 576 image tokens, then the question."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    n_visual = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    prefix = min(PREFIX, text_tokens - 1)
    rand = lambda n: torch.randint(3, config.text_config.vocab_size - 1, (n,), generator=g).tolist()  # noqa: E731
    ids = [1, *rand(prefix - 1), *[config.image_token_id] * n_visual, *rand(text_tokens - prefix)]
    size = config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(1, 3, size, size, generator=g).to(dtype),
    }


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield


#: The three budgets every pruning method has a preset for: the papers' 192 / 128 / 64 of 576 tokens.
BUDGET_PRESETS = ("r192", "r128", "r64")


def pruning_specs() -> list[str]:
    """Every registered pruning method at the three budgets (the presets it has of them)."""
    import vtc
    from vtc.method import get_method

    methods = [get_method(m) for m in vtc.list_methods()]
    return [f"{m.name}.{p}" for m in methods if m.prunes for p in BUDGET_PRESETS if p in m.presets]


def layer_runs(counts: list[int]) -> str:
    """Per-layer counts as runs, ``"0-2:640 3-31:196"``: the schedule in one short field."""
    runs: list[list[int]] = []
    for i, n in enumerate(counts):
        if runs and runs[-1][2] == n:
            runs[-1][1] = i
        else:
            runs.append([i, i, n])
    return " ".join(f"{a}-{b}:{n}" if a != b else f"{a}:{n}" for a, b, n in runs)


def prefill_benchmark(
    model: nn.Module,
    sample: dict[str, torch.Tensor],
    specs: list[str],
    *,
    warmup: int = 2,
    repeats: int = 7,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Prefill time of dense vs each method spec vs a slicing oracle replaying that spec's schedule.

    Each spec first runs once through vtc; its measured schedule (``Schedule.from_stats``) is what the
    oracle replays, so the oracle and vtc compute on the very same tokens at every layer and vtc/oracle is
    vtc's own overhead. Returns one row per spec with milliseconds, speedups over dense, vtc's speedup as a
    fraction of the oracle's, and the FLOPs-ideal speedups (decoder layers; whole forward).
    """
    import vtc

    device = next(model.parameters()).device
    sample = {k: v.to(device) for k, v in sample.items()}
    length = sample["input_ids"].shape[1]

    def call() -> None:
        with torch.no_grad():
            model(**sample, use_cache=True, logits_to_keep=1)  # generate's prefill

    providers: dict[str, tuple[Callable[[], Any], Callable[[], contextlib.AbstractContextManager]]] = {
        "dense": (call, nothing)
    }
    plans = {}
    for spec in specs:
        config = vtc.resolve(spec)
        with vtc.apply(model, config) as handle:
            call()
            stats, report = handle.stats, handle.stats.flops
            schedule = Schedule.from_stats(stats, length, renumbering_methods(handle.configs))
        plans[spec] = (stats, report, schedule)
        providers[f"oracle {spec}"] = (call, lambda s=schedule: SliceOracle(model, s))
        providers[f"vtc {spec}"] = (call, lambda c=config: vtc.apply(model, c))
    timings = time_round_robin(providers, device, warmup, repeats, progress)
    dense = timings["dense"].median_ms
    rows = []
    for spec, (stats, report, schedule) in plans.items():
        oracle, ours = timings[f"oracle {spec}"].median_ms, timings[f"vtc {spec}"].median_ms
        rows.append(
            {
                "spec": spec,
                "layer": schedule.slices[0].layer if schedule.slices else -1,
                "visual_kept": stats.visual_per_layer[-1][0],
                "visual_total": sum(stats.image_tokens),
                "dense_ms": dense,
                "oracle_ms": oracle,
                "vtc_ms": ours,
                "oracle_speedup": dense / oracle,
                "vtc_speedup": dense / ours,
                "vtc_over_oracle": (dense / ours) / (dense / oracle),
                "flops_ideal_decoder": report.prefill_dense / report.prefill,
                "flops_ideal_forward": report.total_dense / report.total,
                "backends": ",".join(f"{k}={v}" for k, v in sorted(stats.backends.items())),
                "tokens_per_layer": layer_runs([n[0] for n in stats.tokens_per_layer]),
                "prepass_layers": schedule.prepass_layers,
                "trimmed_cache_layers": len(schedule.cache_trim),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; `columns` holds (key, header, format spec)."""
    head = [h for _, h, _ in columns]
    body = [[format(r[k], f) for k, _, f in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
