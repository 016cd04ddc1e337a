"""Benchmark vtc's kernels against what they replace, on shapes from real vision-language models.

Each op runs under several providers (the ``provider`` axis):

- ``attn_rows+topk``: the keep set of an attention-guided pruner (R text rows score the visual tokens,
  top-k keeps a quarter). ``eager`` is what switching the model to eager attention costs: the full
  ``[B, Hq, L, L]`` probabilities (transformers' eager path: repeat_kv, fp32 softmax cast back),
  then the row/column mean and ``torch.topk``; ``torch`` is vtc's reference (O(R x L) memory);
  ``triton`` is vtc's kernels.
- ``topk_gather``: the kept tokens' hidden states and positions. ``torch-topk`` is ``torch.topk`` +
  sort + one gather per tensor (ties not stable); ``torch`` is vtc's stable reference; ``triton``.
- ``dup_select``: DART's picks against 8 pivots. ``torch`` (reference) and ``triton``.

Time is the median over repetitions (CUDA events with the L2 cache flushed before each on a GPU;
wall clock on a CPU). Peak memory is what a call allocates beyond its inputs (the CUDA allocator's
peak; on a CPU the op-granular peak of the torch profiler's memory events). The bandwidth floor is
the bytes an op must move at least (read its inputs once, write its outputs once) over the copy
bandwidth measured on the device; ``x_floor`` = time / floor.

Rows are appended to ``benchmarks/results/kernels.csv``. Triton providers need a CUDA device; on a
CPU they are skipped with the reason printed.

Usage::

    python benchmarks/bench_kernels.py --quick        # small shapes, any device
    python benchmarks/bench_kernels.py                # every shape (meant for a GPU)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vtc import kernels
from vtc.kernels.attn_rows.reference import attn_rows_reference
from vtc.kernels.dispatch import interpreting
from vtc.kernels.dup_select.reference import dup_select_reference
from vtc.kernels.topk_gather.reference import topk_gather_reference

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.csv"
COLUMNS = (
    "date",
    "device",
    "device_name",
    "op",
    "shape",
    "dtype",
    "provider",
    "time_ms",
    "peak_mem_mib",
    "bytes_floor_mb",
    "floor_ms",
    "x_floor",
    "note",
)
ROWS = 32  # text rows that score the visual tokens (a question's tokens)
PIVOTS = 8  # DART's default 4 image + 4 text pivots


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model's attention and sequence shape (batch 1).

    Attributes:
        name: model and input.
        heads, kv_heads, head_dim, hidden: the language model's attention and hidden sizes.
        seq: prompt tokens; visual tokens start at ``visual_start`` and number ``visual``.
    """

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    seq: int
    visual_start: int
    visual: int

    @property
    def keep(self) -> int:
        return self.visual // 4

    @property
    def label(self) -> str:
        return f"{self.name} L={self.seq} V={self.visual} H={self.heads}/{self.kv_heads}"


LLAVA_15 = Shape("llava-1.5-7b", 32, 32, 128, 4096, 650, 35, 576)
QWEN25_IMAGE = Shape("qwen2.5-vl-7b", 28, 4, 128, 3584, 1400, 15, 1296)
SHAPES = [
    LLAVA_15,
    Shape("llava-next-7b", 32, 32, 128, 4096, 2990, 35, 2880),
    QWEN25_IMAGE,
    Shape("video-8k/qwen2.5-vl-7b", 28, 4, 128, 3584, 8192, 15, 8000),
    Shape("video-32k/qwen2.5-vl-7b", 28, 4, 128, 3584, 32768, 15, 32500),
]
QUICK_SHAPES = [LLAVA_15, QWEN25_IMAGE]


@dataclasses.dataclass
class Result:
    op: str
    shape: Shape
    provider: str
    time_ms: float
    peak_bytes: float
    floor_bytes: float
    note: str = ""


# -- measurement ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy (read + write): the practical bandwidth ceiling."""
    n = (512 if device.type == "cuda" else 128) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n / best


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn` after a warm-up call (which also compiles Triton kernels)."""
    fn()
    sync(device)
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # larger than any L2
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """Bytes `fn` allocates at its peak beyond what was allocated before it ran."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def measure(op: str, shape: Shape, provider: str, fn, floor: float, device, reps: int) -> Result:
    try:
        t = time_ms(fn, device, reps)
        mem = peak_bytes(fn, device)
        return Result(op, shape, provider, t, mem, floor)
    except torch.OutOfMemoryError:
        return Result(op, shape, provider, math.nan, math.nan, floor, "out of memory")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- the ops -------------------------------------------------------------------------------------------


def visual_mask(s: Shape, device) -> torch.Tensor:
    pos = torch.arange(s.seq, device=device)
    return ((pos >= s.visual_start) & (pos < s.visual_start + s.visual))[None]  # [1, L]


def bench_attn(s: Shape, dtype, device, providers: list[str], reps: int) -> list[Result]:
    group = s.heads // s.kv_heads
    scale = s.head_dim**-0.5
    q_all = torch.randn(1, s.heads, s.seq, s.head_dim, dtype=dtype, device=device)  # every query (eager's input)
    k = torch.randn(1, s.kv_heads, s.seq, s.head_dim, dtype=dtype, device=device)
    rows = torch.arange(s.visual_start + s.visual, s.visual_start + s.visual + ROWS, device=device)  # text after
    cols = torch.arange(s.visual_start, s.visual_start + s.visual, device=device)  # the visual tokens
    q_rows = q_all[:, :, rows].contiguous()  # [1, Hq, R, D]: what a tap hands the kernel
    q_pos, columns = rows[None], cols[None]  # [1, R], [1, S]
    elt = q_all.element_size()
    floor = (s.heads * ROWS + s.kv_heads * s.seq) * s.head_dim * elt + 8 * (ROWS + s.visual) + 4 * s.visual + 8 * s.keep

    # The model builds its causal mask once per forward, for every layer: not part of the timed work.
    mask = torch.full((s.seq, s.seq), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)  # [L, L]

    def eager():
        kr = k.repeat_interleave(group, dim=1)  # repeat_kv: [1, Hq, L, D]
        w = torch.matmul(q_all, kr.transpose(2, 3)) * scale + mask  # [1, Hq, L, L]
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(dtype)
        scores = w[:, :, rows][:, :, :, cols].float().mean(dim=(1, 2))  # [1, R, S] rows -> [1, S]
        return torch.topk(scores, s.keep, dim=1).indices.sort(dim=1).values

    def reference():
        scores = attn_rows_reference(q_rows, k, scale=scale, q_pos=q_pos, columns=columns)
        return topk_gather_reference(scores, s.keep).indices

    def triton():
        scores = kernels.attn_rows(q_rows, k, scale=scale, q_pos=q_pos, columns=columns, backend="triton")
        return kernels.topk_gather(scores, s.keep, backend="triton").indices

    fns = {"eager": eager, "torch": reference, "triton": triton}
    return [measure("attn_rows+topk", s, p, fns[p], floor, device, reps) for p in ["eager", *providers]]


def bench_topk(s: Shape, dtype, device, providers: list[str], reps: int) -> list[Result]:
    scores = torch.rand(1, s.seq, device=device)  # [1, L] fp32 attention scores
    valid = visual_mask(s, device)
    hidden = torch.randn(1, s.seq, s.hidden, dtype=dtype, device=device)  # [1, L, d]
    positions = torch.arange(s.seq, device=device)[None]  # [1, L]
    row_bytes = s.hidden * hidden.element_size() + positions.element_size()
    floor = s.seq * (scores.element_size() + 1) + s.keep * (2 * row_bytes + 9)

    def torch_topk():
        idx = torch.topk(scores.masked_fill(~valid, -math.inf), s.keep, dim=1).indices.sort(dim=1).values  # [1, K]
        return hidden.gather(1, idx[..., None].expand(-1, -1, s.hidden)), positions.gather(1, idx)

    fns = {
        "torch-topk": torch_topk,
        "torch": lambda: topk_gather_reference(scores, s.keep, hidden, positions, valid=valid),
        "triton": lambda: kernels.topk_gather(scores, s.keep, hidden, positions, valid=valid, backend="triton"),
    }
    return [measure("topk_gather", s, p, fns[p], floor, device, reps) for p in ["torch-topk", *providers]]


def bench_dup(s: Shape, dtype, device, providers: list[str], reps: int) -> list[Result]:
    feats = torch.randn(1, s.seq, s.hidden, dtype=dtype, device=device)  # [1, L, d] final-normed hidden states
    pivot_pos = torch.linspace(s.visual_start, s.seq - 1, PIVOTS, device=device).long()
    pivots = feats[:, pivot_pos]  # [1, P, d]
    counts = torch.full((1, PIVOTS), s.keep // PIVOTS, device=device)
    pool = visual_mask(s, device)
    pool[:, pivot_pos] = False
    floor = (s.seq + PIVOTS) * s.hidden * feats.element_size() + 2 * s.seq + 8 * PIVOTS
    fns = {
        "torch": lambda: dup_select_reference(feats, pivots, counts, pool),
        "triton": lambda: kernels.dup_select(feats, pivots, counts, pool, backend="triton"),
    }
    return [measure("dup_select", s, p, fns[p], floor, device, reps) for p in providers]


OPS = {"attn_rows": bench_attn, "topk_gather": bench_topk, "dup_select": bench_dup}


# -- report --------------------------------------------------------------------------------------------


def triton_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "no CUDA device (Triton runs on CPU only in its interpreter, which is for tests)"
    if interpreting():
        return "TRITON_INTERPRET is set; unset it to benchmark compiled kernels"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton does not import ({exc})"
    return None


def fmt(x: float, digits: int = 3) -> str:
    """`digits` significant digits, without switching to exponents for large numbers."""
    if math.isnan(x):
        return "-"
    return f"{x:.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def print_table(results: list[Result], bandwidth: float) -> None:
    baseline = {}
    for r in results:
        baseline.setdefault((r.op, r.shape.name), r.time_ms)  # the first provider of each (op, shape)
    header = ("op", "shape", "provider", "time ms", "speedup", "peak MiB", "floor MB", "floor ms", "x floor", "note")
    lines = []
    for r in results:
        floor_ms = r.floor_bytes / bandwidth * 1e3
        lines.append(
            (
                r.op,
                r.shape.label,
                r.provider,
                fmt(r.time_ms),
                fmt(baseline[(r.op, r.shape.name)] / r.time_ms, 3) + "x",
                fmt(r.peak_bytes / 2**20),
                fmt(r.floor_bytes / 1e6),
                fmt(floor_ms),
                fmt(r.time_ms / floor_ms, 3),
                r.note,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *lines]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def save(results: list[Result], path: Path, device: torch.device, name: str, dtype, bandwidth: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        for r in results:
            floor_ms = r.floor_bytes / bandwidth * 1e3
            writer.writerow(
                [
                    date,
                    device.type,
                    name,
                    r.op,
                    r.shape.label,
                    str(dtype).removeprefix("torch."),
                    r.provider,
                    fmt(r.time_ms, 4),
                    fmt(r.peak_bytes / 2**20, 4),
                    fmt(r.floor_bytes / 1e6, 4),
                    fmt(floor_ms, 4),
                    fmt(r.time_ms / floor_ms, 4),
                    r.note,
                ]
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the small shapes (runs on a CPU in minutes)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {', '.join(OPS)}")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20 GPU, 3 CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="CSV to append rows to")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU matmuls are fastest in fp32
    reps = args.reps or (20 if device.type == "cuda" else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} cpu"
    if device.type == "cpu":
        name += f", {torch.get_num_threads()} threads"
    providers = ["torch", "triton"]
    if (reason := triton_skip_reason(device)) is not None:
        print(f"skipping the triton provider: {reason}")
        providers = ["torch"]
    bandwidth = copy_bandwidth(device)
    print(f"device: {name}; dtype {str(dtype).removeprefix('torch.')}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    torch.manual_seed(0)
    results: list[Result] = []
    for op in args.ops.split(","):
        for shape in QUICK_SHAPES if args.quick else SHAPES:
            print(f"  {op} {shape.label} ...", flush=True)
            results += OPS[op](shape, dtype, device, providers, reps)
    print()
    print_table(results, bandwidth)
    if not args.no_save:
        save(results, args.out, device, name, dtype, bandwidth)
        print(f"\nappended {len(results)} rows to {args.out}")


if __name__ == "__main__":
    main()
