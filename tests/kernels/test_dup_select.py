"""``dup_select``: the reference against a naive loop, the Triton kernels against the reference (exactly)."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch
from kernel_testing import DTYPES, assert_equal, cuda_device, generator

from vtc import kernels
from vtc.kernels.dup_select.reference import dup_select_reference


@dataclasses.dataclass(frozen=True)
class Case:
    """One dup_select call; ``id`` reads like it.

    ``feats="dups"`` draws small-integer features from a few prototypes, scaled by powers of two, plus
    zero vectors: their dot products and squared norms are exact in fp32 whatever the summation order,
    so the many exact ties of similarity must break the same way (to the lower index) in every backend.
    ``"normal"`` features are continuous.
    """

    batch: int
    n: int
    dim: int
    pivots: int
    feats: str = "dups"
    pool: str = "holes"  # "holes": random holes and one batch row with an empty pool; "full"
    counts: str = "mixed"  # "mixed": zeros, negatives and more than the pool holds; "small"
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        shape = f"B{self.batch}-N{self.n}-D{self.dim}-P{self.pivots}"
        return "-".join([shape, self.feats, f"pool-{self.pool}", f"counts-{self.counts}", str(self.dtype)[6:]])


def make_inputs(case: Case, device: str = "cpu") -> tuple:
    """(feats, pivots, counts, pool) drawn fresh for `case`."""
    g = generator(zlib.crc32(case.id.encode()))
    if case.feats == "dups":
        protos = torch.randint(-3, 4, (7, case.dim), generator=g).float()
        feats = protos[torch.randint(0, 7, (case.batch, case.n), generator=g)]  # [B, N, D]
        feats = feats * 2.0 ** torch.randint(-2, 3, (case.batch, case.n, 1), generator=g).float()
        feats[:, 1::9] = 0.0  # zero vectors: similarity 0 through the norm floor
        pivots = torch.randint(-3, 4, (case.batch, case.pivots, case.dim), generator=g).float()
        pivots[:, -1] = 0.0  # an unused pivot, zeroed as DART does
    else:
        feats = torch.randn(case.batch, case.n, case.dim, generator=g)
        pivots = torch.randn(case.batch, case.pivots, case.dim, generator=g)
    if case.counts == "mixed":
        counts = torch.randint(-1, max(2, case.n // case.pivots + 3), (case.batch, case.pivots), generator=g)
        counts[0, 0] = case.n + 1  # more than the whole pool
    else:
        counts = torch.randint(0, 4, (case.batch, case.pivots), generator=g)
    pool = torch.ones(case.batch, case.n, dtype=torch.bool)
    if case.pool == "holes":
        pool = torch.rand(case.batch, case.n, generator=g) > 0.2
        if case.batch > 1:
            pool[-1] = False
    to = {"device": device}
    return feats.to(case.dtype).to(**to), pivots.to(case.dtype).to(**to), counts.to(**to), pool.to(**to)


CASES = [
    *(Case(2, 37, 40, 5, dtype=d) for d in DTYPES),
    Case(2, 61, 33, 8, feats="normal", counts="small"),
    Case(2, 61, 33, 8, feats="normal", counts="small", dtype=torch.bfloat16),
    Case(1, 5, 16, 3),  # counts exceed the pool
    Case(2, 40, 100, 1, pool="full"),  # one pivot; feature dim across two blocks
    Case(3, 30, 24, 4, counts="small"),
    Case(1, 2100, 64, 8, counts="small"),  # a long row across warps
]


# -- the reference against a naive loop ---------------------------------------------------------------


def naive_dup_select(feats, pivots, counts, pool, eps=1e-6):
    """The contract, one token at a time, in Python floats."""
    out = torch.zeros_like(pool)
    for b in range(feats.shape[0]):
        f, p = feats[b].double().tolist(), pivots[b].double().tolist()
        norm = [max(math.sqrt(sum(x * x for x in v)), eps) for v in f]
        available = [j for j in range(len(f)) if pool[b, j]]
        for i, piv in enumerate(p):
            piv_norm = max(math.sqrt(sum(x * x for x in piv)), eps)
            sim = {j: sum(a * c for a, c in zip(piv, f[j], strict=True)) / (piv_norm * norm[j]) for j in available}
            chosen = sorted(available, key=lambda j: (sim[j], j))[: max(0, int(counts[b, i]))]
            for j in chosen:
                out[b, j] = True
            available = [j for j in available if j not in chosen]
    return out


@pytest.mark.parametrize("case", [c for c in CASES if c.n < 100 and c.dtype == torch.float32], ids=lambda c: c.id)
def test_reference_matches_naive_loop(case):
    feats, pivots, counts, pool = make_inputs(case)
    assert_equal(dup_select_reference(feats, pivots, counts, pool), naive_dup_select(feats, pivots, counts, pool), "")


def test_reference_pivot_order_and_ties():
    """Both pivots like token 2 least; the first takes it, the second its next choice (a tie goes low)."""
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
    pool = torch.ones(1, 4, dtype=torch.bool)
    counts = torch.tensor([[1, 1]])
    picked = dup_select_reference(feats, torch.tensor([[[1.0, 0.0], [1.0, 0.1]]]), counts, pool)
    assert picked.tolist() == [[False, False, True, True]]  # then (1, 0.1) likes token 3 (-0.0995) least
    picked = dup_select_reference(feats, torch.tensor([[[1.0, 0.1], [1.0, 0.0]]]), counts, pool)
    assert picked.tolist() == [[False, True, True, False]]  # then (1, 0) ties tokens 1 and 3 at 0: token 1


# -- Triton against the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case):
    feats, pivots, counts, pool = make_inputs(case)
    expected = dup_select_reference(feats, pivots, counts, pool)
    assert_equal(kernels.dup_select(feats, pivots, counts, pool, backend="triton"), expected, "picked")


@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[7]], ids=lambda c: c.id)
def test_triton_matches_reference_across_chunks(case, monkeypatch):
    """Rows read in 16-element chunks: the pool state and the ties must carry from chunk to chunk."""
    from vtc.kernels import _triton_select

    monkeypatch.setattr(_triton_select, "MAX_SINGLE", 8)
    monkeypatch.setattr(_triton_select, "MAX_CHUNK", 16)
    feats, pivots, counts, pool = make_inputs(case)
    expected = dup_select_reference(feats, pivots, counts, pool)
    assert_equal(kernels.dup_select(feats, pivots, counts, pool, backend="triton"), expected, "picked")


# -- on a GPU ---------------------------------------------------------------------------------------------

# Small-integer features: their similarities are exact in any summation order, so the comparison can be
# exact too. (Continuous features at these lengths have neighbours closer than fp32 rounding.)
GPU_CASES = [
    Case(1, 650, 4096, 8, pool="full", counts="small", dtype=torch.bfloat16),  # LLaVA-1.5-7B
    Case(2, 2990, 4096, 8, dtype=torch.bfloat16),  # LLaVA-NeXT, a padded batch
    Case(1, 8192, 3584, 8, dtype=torch.float16),  # Qwen2.5-VL-7B video
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_triton_matches_reference(case):
    device = cuda_device()
    feats, pivots, counts, pool = make_inputs(case, device=device)
    with kernels.record() as rec:
        actual = kernels.dup_select(feats, pivots, counts, pool)  # auto must pick Triton on CUDA
    assert rec == {"dup_select": "triton"}
    assert_equal(actual, dup_select_reference(feats, pivots, counts, pool), "picked")
