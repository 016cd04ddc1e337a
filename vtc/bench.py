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
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc import surface

if TYPE_CHECKING:
    from vtc.config import MethodConfig
    from vtc.state import TokenStats

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


@dataclasses.dataclass(frozen=True)
class Slice:
    """One gather of the token sequence at the input of a decoder layer.

    Attributes:
        layer: the decoder layer whose input is gathered (0 = the embeddings).
        positions: ``[n]`` input positions of the tokens that stay, ascending.
        index: ``[n]`` slots of those tokens in the sequence before the gather.
        fresh: the kept tokens are renumbered 0..n-1 for the rotary embeddings (GemFilter's second pass)
            instead of keeping the positions they had.
    """

    layer: int
    positions: torch.Tensor
    index: torch.Tensor
    fresh: bool = False


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pruned prefill's token schedule as vtc measured it, for one unpadded sequence.

    Attributes:
        input_length: tokens of the text backbone's input.
        slices: the gathers in execution order; stages that kept every token are left out (no gather).
        prepass_layers: layers ``0..prepass_layers-1`` first run on the whole input without a cache
            (GemFilter's pre-pass); 0 for none.
        cache_trim: ``(layer, [n] slots)`` pairs: after the prefill, that layer's KV cache keeps only those
            slots of the tokens it computed on (MustDrop's output-aware cache).
    """

    input_length: int
    slices: tuple[Slice, ...] = ()
    prepass_layers: int = 0
    cache_trim: tuple[tuple[int, torch.Tensor], ...] = ()

    @classmethod
    def from_stats(cls, stats: TokenStats, input_length: int, fresh: Collection[str] = ()) -> Schedule:
        """The schedule that ``stats`` of one vtc prefill record.

        Everything comes from the measurements and nothing from a method's code, so the oracle follows any
        stage a method adds: each stage's ``kept_tokens`` gives a gather, ``prepass_tokens_per_layer`` the
        pre-pass, and a layer whose ``cache_tokens_per_layer`` is below its ``tokens_per_layer`` a cache trim.

        Args:
            stats: the handle's stats after one prefill of batch size 1 without padding.
            input_length: tokens of that prefill's input (the stages record positions into it).
            fresh: names of the methods whose stages renumber the tokens they keep. The stats record input
                positions only, so this comes from the configs (``renumbering_methods``).
        """
        if stats.batch_size != 1:
            raise ValueError(f"the slicing oracle replays one unpadded row; these stats hold {stats.batch_size}.")
        slices: list[Slice] = []
        current = torch.arange(input_length)
        for stage in stats.stages:
            kept = stage.kept_tokens[0].long()
            if len(kept) == len(current):
                continue  # the stage ran (its scoring is vtc's cost) but gathered nothing
            index = torch.searchsorted(current, kept).clamp(max=len(current) - 1)
            if not bool((current[index] == kept).all()):
                raise ValueError(f"stage {stage.method}@{stage.layer} keeps tokens that an earlier stage dropped.")
            slices.append(Slice(stage.layer, kept, index, stage.method in fresh))
            current = kept
        trim = []
        held_per_layer = stats.cache_tokens_per_layer or stats.tokens_per_layer  # no cache: nothing trimmed
        for layer, (computed, held) in enumerate(zip(stats.tokens_per_layer, held_per_layer, strict=True)):
            if held[0] == computed[0]:
                continue
            if held[0] != len(current):
                raise ValueError(
                    f"layer {layer} caches {held[0]} of its {computed[0]} tokens, but the prefill ends with "
                    f"{len(current)}; the oracle replays only trims to the final tokens."
                )
            seen = next((s.positions for s in reversed(slices) if s.layer <= layer), torch.arange(input_length))
            trim.append((layer, torch.searchsorted(seen, current)))
        return cls(input_length, tuple(slices), len(stats.prepass_tokens_per_layer), tuple(trim))

    def to(self, device: torch.device) -> Schedule:
        """The same schedule with its index tensors on `device`."""
        return dataclasses.replace(
            self,
            slices=tuple(dataclasses.replace(s, index=s.index.to(device)) for s in self.slices),
            cache_trim=tuple((layer, slots.to(device)) for layer, slots in self.cache_trim),
        )


def renumbering_methods(configs: Iterable[MethodConfig]) -> frozenset[str]:
    """Methods among `configs` whose stages renumber the tokens they keep (``positions="fresh"``)."""
    return frozenset(c.method for c in configs if getattr(c, "positions", "original") == "fresh")


class _PrepassDone(Exception):  # noqa: N818  (control flow, not an error)
    """Raised after the oracle's pre-pass reaches its last layer, to stop the backbone."""


class SliceOracle:
    """The cheapest possible replay of a pruning schedule: the same gathers, with no scoring at all.

    It runs the measured schedule of a vtc prefill on the unwrapped model: the same pre-pass, a gather of
    the hidden states and rotary embeddings at each stage's layer to the very tokens vtc kept, the same
    renumbering, and the same cache trim after the prefill. It decides nothing, so it says nothing about
    accuracy; it is the speed ceiling of that schedule, and a method's speedup over dense divided by this
    oracle's measures only vtc's own cost (scoring, taps, bookkeeping). Its hooks are its own (it does not
    use ``vtc.wrap``), and it handles one unpadded row, the benchmark's case.

    After each forward, ``tokens_per_layer`` and ``prepass_tokens_per_layer`` hold the token counts the
    decoder layers actually received.
    """

    def __init__(self, model: nn.Module, schedule: Schedule) -> None:
        from vtc.adapters import adapter_for

        parts = adapter_for(model)  # finds the text backbone and its layers; installs nothing
        self.model, self.schedule = model, schedule
        self._text_model, self._layers, self._rotary = parts.text_model, parts.layers, parts.rotary
        self._config = parts.text_config
        if any(t != "full_attention" for t in getattr(self._config, "layer_types", None) or ()):
            raise ValueError("the slicing oracle builds full causal masks; this model has sliding-window layers.")
        self._by_layer: dict[int, list[Slice]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._in_prepass = False
        self._segment: tuple[tuple[torch.Tensor, ...], Any] | None = None  # (cos, sin), mask after a gather
        self._cache: Any = None
        self._trim: tuple[tuple[int, torch.Tensor], ...] = ()
        self.tokens_per_layer: list[int] = []
        self.prepass_tokens_per_layer: list[int] = []

    # -- hooks --------------------------------------------------------------------------------------
    def _on_text_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._in_prepass:
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[0] != 1 or embeds.shape[1] != self.schedule.input_length:
            shape = None if embeds is None else tuple(embeds.shape[:2])
            raise ValueError(
                f"the slicing oracle replays a prefill of one row of {self.schedule.input_length} tokens; "
                f"the text backbone got inputs of shape {shape}."
            )
        mask = kwargs.get(surface.ATTENTION_MASK)
        if mask is not None and not bool(mask.all()):
            raise ValueError("the slicing oracle replays unpadded rows; this attention mask hides tokens.")
        self._cache = surface.get_cache(kwargs)
        if self._cache is not None and surface.cached_length(self._cache) > 0:
            raise ValueError("the slicing oracle replays prefills; this forward continues a cache.")
        self._segment = None
        self.tokens_per_layer, self.prepass_tokens_per_layer = [], []
        if self.schedule.prepass_layers:
            self._run_prepass(kwargs)

    def _run_prepass(self, kwargs: dict) -> None:
        """Layers ``0..prepass_layers-1`` on the whole input, without a cache, as GemFilter's first pass."""

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise _PrepassDone

        handle = self._layers[self.schedule.prepass_layers - 1].register_forward_hook(stop)
        self._in_prepass = True
        try:
            self._text_model(**surface.with_cache({**kwargs, "use_cache": False}, self._text_model, None))
        except _PrepassDone:
            pass
        finally:
            self._in_prepass = False
            handle.remove()

    def _on_layer(self, i: int) -> Callable[..., tuple[tuple, dict] | None]:
        slices = self._by_layer.get(i, [])

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hidden = args[0] if args else kwargs[surface.HIDDEN_STATES]
            if self._in_prepass:
                self.prepass_tokens_per_layer.append(hidden.shape[1])
                return None
            for s in slices:
                hidden = hidden.index_select(1, s.index)  # [1, L, d] -> [1, n, d]
                if s.fresh:
                    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, n]
                    cos_sin = tuple(self._rotary(hidden, positions))
                else:
                    source = self._segment[0] if self._segment else kwargs[surface.POSITION_EMBEDDINGS]
                    cos_sin = tuple(t.index_select(-2, s.index) for t in source)  # [..., 1, L, D] -> [..., 1, n, D]
                mask = surface.causal_mask(self._config, hidden, None, self._cache, None if self._cache is None else i)
                self._segment = (cos_sin, mask)
            self.tokens_per_layer.append(hidden.shape[1])
            if self._segment is None:
                return None
            kwargs[surface.POSITION_EMBEDDINGS], kwargs[surface.ATTENTION_MASK] = self._segment
            if surface.POSITION_IDS in kwargs:
                kwargs[surface.POSITION_IDS] = None  # the rotary embeddings are set; ids with gaps mean nothing
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, surface.HIDDEN_STATES: hidden}

        return hook

    def _on_text_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._in_prepass:
            return
        cache = self._cache if self._cache is not None else surface.output_cache(output)
        if cache is None:
            return
        for layer, slots in self._trim:
            keys, values = surface.layer_kv(cache, layer)
            # [1, Hkv, L, D] -> [1, Hkv, n, D]
            surface.set_layer_kv(cache, layer, keys.index_select(2, slots), values.index_select(2, slots))

    # -- installing ---------------------------------------------------------------------------------
    def __enter__(self) -> SliceOracle:
        device = next(self.model.parameters()).device
        schedule = self.schedule.to(device)
        self._by_layer = {}
        for s in schedule.slices:
            self._by_layer.setdefault(s.layer, []).append(s)
        self._trim = schedule.cache_trim
        text = self._text_model
        self._hooks.append(text.register_forward_pre_hook(self._on_text_start, with_kwargs=True))
        self._hooks.append(text.register_forward_hook(self._on_text_end, with_kwargs=True))
        for i, layer in enumerate(self._layers):
            self._hooks.append(layer.register_forward_pre_hook(self._on_layer(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


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
