"""``attn_rows``: the reference against a naive loop, the Triton kernels against the reference."""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib

import pytest
import torch
from kernel_testing import DTYPES, assert_close, cuda_device, generator, randn

from vtc import kernels
from vtc.kernels.attn_rows.reference import HEAD_REDUCE, ROW_REDUCE, attn_rows_reference

REDUCES = list(itertools.product(HEAD_REDUCE, ROW_REDUCE))


@dataclasses.dataclass(frozen=True)
class Case:
    """One attn_rows shape and the masks it uses; ``id`` reads like the shape."""

    batch: int
    hq: int
    hkv: int
    rows: int
    lk: int
    dim: int
    n_cols: int | None = None  # None: every key (columns=None)
    causal: bool = False  # q_pos per row, some rows seeing no key, some seeing all
    kv_pad: bool = False  # padded keys, and a batch row with no valid key
    row_pad: bool = False  # row_valid with a batch row of no valid row
    scale: float | None = None  # None: 1 / sqrt(dim)
    config: dict | None = None  # forced Triton block sizes, to run every loop

    @property
    def id(self) -> str:
        cols = "all" if self.n_cols is None else str(self.n_cols)
        flags = [f for f in ("causal", "kv_pad", "row_pad") if getattr(self, f)]
        flags += [f"scale{self.scale}"] if self.scale else []
        flags += ["forced-blocks"] if self.config else []
        shape = f"B{self.batch}-Hq{self.hq}-Hkv{self.hkv}-R{self.rows}-L{self.lk}-D{self.dim}-S{cols}"
        return "-".join([shape, *flags])


def make_inputs(case: Case, dtype: torch.dtype, seed: int, device: str = "cpu") -> tuple:
    """(q_rows, k, kwargs) for `case`, drawn fresh from `seed`."""
    g = generator(seed)
    q = randn(case.batch, case.hq, case.rows, case.dim, gen=g, dtype=dtype, device=device)
    k = randn(case.batch, case.hkv, case.lk, case.dim, gen=g, dtype=dtype, device=device)
    kw: dict = {"scale": case.scale or case.dim**-0.5}
    if case.causal:
        # Mostly the last rows of the sequence; -1 (no key at all) and past-the-end (every key) included.
        pos = case.lk - case.rows + torch.arange(case.rows).repeat(case.batch, 1)  # [B, R]
        pos = torch.where(torch.rand(pos.shape, generator=g) < 0.3, torch.randint(-1, case.lk + 3, pos.shape), pos)
        pos[0, 0] = -1
        kw["q_pos"] = pos.to(device)
    if case.kv_pad:
        valid = torch.rand(case.batch, case.lk, generator=g) > 0.2
        valid[0, : case.lk // 4] = False  # left padding
        if case.batch > 1:
            valid[-1] = False  # a batch row whose keys are all padding
        kw["kv_valid"] = valid.to(device)
    if case.n_cols is not None:
        cols = torch.randint(-2, case.lk + 2, (case.batch, case.n_cols), generator=g)  # out-of-range included
        cols[:, 0] = case.lk - 1
        kw["columns"] = cols.to(device)
    if case.row_pad:
        row_valid = torch.rand(case.batch, case.rows, generator=g) > 0.3
        row_valid[0, 0] = True
        if case.batch > 1:
            row_valid[-1] = False
        kw["row_valid"] = row_valid.to(device)
    return q, k, kw


CASES = [
    Case(1, 4, 4, 1, 37, 16),  # one row (the last token) against every key
    Case(2, 6, 2, 5, 77, 24, n_cols=19, causal=True, kv_pad=True, row_pad=True),  # GQA 3:1, odd sizes
    Case(1, 7, 1, 3, 50, 32, n_cols=50, causal=True),  # Qwen2.5-VL's 7:1 grouping
    Case(1, 2, 2, 20, 40, 8, n_cols=7, row_pad=True, config={"row_block": 4, "out_row_block": 16}),
    Case(1, 4, 2, 2, 300, 80, causal=True, config={"splits": 5, "key_block": 16, "col_block": 64}),
    Case(1, 2, 1, 4, 64, 16, n_cols=64, scale=2.5),  # peaked softmax: logits of tens
    Case(2, 2, 2, 3, 20, 16, causal=True, kv_pad=True),  # rows and a batch row that see no key
]


# -- the reference against a naive loop ---------------------------------------------------------------


def naive_attn_rows(q, k, *, scale, q_pos=None, kv_valid=None, columns=None, head_reduce, row_reduce, row_valid=None):
    """The contract, one probability at a time, in Python floats (float64)."""
    batch, hq, rows, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    qs, ks = q.float().tolist(), k.float().tolist()
    out = []
    for b in range(batch):
        cols = columns[b].tolist() if columns is not None else list(range(lk))
        probs = []  # [Hq][R][S]
        for h in range(hq):
            per_row = []
            for r in range(rows):
                keys = [
                    j
                    for j in range(lk)
                    if (q_pos is None or j <= q_pos[b, r]) and (kv_valid is None or bool(kv_valid[b, j]))
                ]
                logit = {
                    j: scale * sum(a * c for a, c in zip(qs[b][h][r], ks[b][h // (hq // hkv)][j], strict=True))
                    for j in keys
                }
                top = max(logit.values(), default=0.0)
                z = sum(math.exp(v - top) for v in logit.values())
                per_row.append([math.exp(logit[c] - top) / z if c in logit else 0.0 for c in cols])
            probs.append(per_row)
        if head_reduce != "none":
            fold = (lambda xs: sum(xs) / hq) if head_reduce == "mean" else max
            probs = [[[fold([probs[h][r][s] for h in range(hq)]) for s in range(len(cols))] for r in range(rows)]]
        valid = [row_valid is None or bool(row_valid[b, r]) for r in range(rows)]
        n_valid = sum(valid)
        reduced = []
        for per_row in probs:  # one entry per head, or one when heads are reduced
            kept = [row for row, ok in zip(per_row, valid, strict=True) if ok]
            if row_reduce == "none":
                reduced.append([row if ok else [0.0] * len(cols) for row, ok in zip(per_row, valid, strict=True)])
            elif row_reduce == "max":
                reduced.append([max((row[s] for row in kept), default=0.0) for s in range(len(cols))])
            else:
                total = [sum(row[s] for row in kept) for s in range(len(cols))]
                reduced.append([t / n_valid if row_reduce == "mean" and n_valid else t for t in total])
        out.append(reduced if head_reduce == "none" else reduced[0])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("head_reduce", "row_reduce"), REDUCES, ids=[f"heads-{h}-rows-{r}" for h, r in REDUCES])
def test_reference_matches_naive_loop(head_reduce, row_reduce):
    case = Case(2, 4, 2, 3, 9, 4, n_cols=6, causal=True, kv_pad=True, row_pad=True)
    q, k, kw = make_inputs(case, torch.float32, seed=11)
    expected = naive_attn_rows(q, k, **kw, head_reduce=head_reduce, row_reduce=row_reduce)
    actual = attn_rows_reference(q, k, **kw, head_reduce=head_reduce, row_reduce=row_reduce)
    assert_close(actual, expected.float(), torch.float32)


def test_reference_rows_sum_to_one_over_all_keys():
    """Without columns, each row's probabilities over its permitted keys sum to 1 (the full normaliser)."""
    case = Case(2, 6, 3, 4, 33, 8, causal=True, kv_pad=True)
    q, k, kw = make_inputs(case, torch.float32, seed=3)
    probs = attn_rows_reference(q, k, **kw, head_reduce="none", row_reduce="none")  # [B, Hq, R, Lk]
    sees_a_key = (torch.arange(case.lk) <= kw["q_pos"][..., None]) & kw["kv_valid"][:, None, :]  # [B, R, Lk]
    expected = sees_a_key.any(-1)[:, None, :].expand(-1, case.hq, -1).float()
    assert_close(probs.sum(-1), expected, torch.float32, "row sums")


def test_reference_ignores_repeated_kv_layout():
    """GQA without repeating K equals MHA on transformers' repeat_kv layout (query head h reads h // G)."""
    case = Case(1, 6, 2, 3, 12, 8)
    q, k, kw = make_inputs(case, torch.float32, seed=5)
    repeated = k.repeat_interleave(3, dim=1)  # [B, Hq, Lk, D], as repeat_kv lays it out
    kw = {**kw, "head_reduce": "none", "row_reduce": "none"}
    assert_close(attn_rows_reference(q, k, **kw), attn_rows_reference(q, repeated, **kw), torch.float32)


# -- Triton against the reference -----------------------------------------------------------------------


def run_triton(q, k, kw, case: Case, **extra):
    if case.config is None:
        return kernels.attn_rows(q, k, **kw, **extra, backend="triton")
    from vtc.kernels.attn_rows.triton_impl import Config, attn_rows_triton

    return attn_rows_triton(q, k, **kw, **extra, config=Config(**case.config))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case, dtype):
    q, k, kw = make_inputs(case, dtype, seed=zlib.crc32(case.id.encode()))
    assert_close(run_triton(q, k, kw, case), attn_rows_reference(q, k, **kw), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("head_reduce", "row_reduce"), REDUCES, ids=[f"heads-{h}-rows-{r}" for h, r in REDUCES])
def test_triton_reductions_match_reference(head_reduce, row_reduce, dtype):
    config = {"splits": 3, "key_block": 16}  # the split-combine path under every reduction
    case = Case(2, 6, 2, 5, 45, 16, n_cols=13, causal=True, kv_pad=True, row_pad=True, config=config)
    q, k, kw = make_inputs(case, dtype, seed=7)
    red = {"head_reduce": head_reduce, "row_reduce": row_reduce}
    assert_close(run_triton(q, k, kw, case, **red), attn_rows_reference(q, k, **kw, **red), dtype)


def test_triton_never_allocates_rows_by_keys(monkeypatch):
    """Every buffer the Triton path allocates is O(rows x (columns + splits)), never O(rows x keys)."""
    from vtc.kernels.attn_rows import triton_impl

    sizes: list[int] = []

    class CountingTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *shape, **kw):
            out = torch.empty(*shape, **kw)
            sizes.append(out.numel())
            return out

        def empty_like(self, t, **kw):
            sizes.append(t.numel())
            return torch.empty_like(t, **kw)

    monkeypatch.setattr(triton_impl, "torch", CountingTorch())
    case = Case(1, 2, 1, 4, 4096, 16, n_cols=8, causal=True)
    q, k, kw = make_inputs(case, torch.float32, seed=2)
    out = triton_impl.attn_rows_triton(q, k, **kw, head_reduce="none", row_reduce="none")
    assert sizes, "the spy saw no allocation"
    assert max(sizes) < case.rows * case.lk / 4, f"allocations {sizes} grow with the key length"
    assert_close(out, attn_rows_reference(q, k, **kw, head_reduce="none", row_reduce="none"), torch.float32)


# -- on a GPU ---------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(1, 32, 32, 32, 650, 128, n_cols=576, causal=True),  # LLaVA-1.5-7B, text rows against the image
    Case(2, 28, 4, 16, 1400, 128, n_cols=1296, causal=True, kv_pad=True, row_pad=True),  # Qwen2.5-VL-7B, padded
    Case(1, 28, 4, 1, 8192, 128, n_cols=8000),  # video, last token
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_triton_matches_reference(case, dtype):
    device = cuda_device()
    q, k, kw = make_inputs(case, dtype, seed=0, device=device)
    with kernels.record() as rec:
        actual = kernels.attn_rows(q, k, **kw)  # auto must pick Triton for CUDA tensors
    assert rec == {"attn_rows": "triton"}
    assert_close(actual, attn_rows_reference(q, k, **kw), dtype)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_keys():
    """At 32k keys the extra memory is the output and the partials: far below one row x keys x heads."""
    device = cuda_device()
    case = Case(1, 28, 4, 32, 32768, 128, n_cols=32000)
    q, k, kw = make_inputs(case, torch.bfloat16, seed=0, device=device)
    kernels.attn_rows(q, k, **kw, backend="triton")  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kernels.attn_rows(q, k, **kw, backend="triton")
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < case.hq * case.rows * case.lk * 4 / 16, f"{extra} bytes beyond the inputs"
