"""``topk_gather``: the reference against a naive loop, the Triton kernels against the reference (exactly)."""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from kernel_testing import assert_equal, cuda_device, generator, randn

from vtc import kernels
from vtc.kernels.topk_gather.reference import topk_gather_reference


@dataclasses.dataclass(frozen=True)
class Case:
    """One topk_gather call shape; ``id`` reads like it."""

    batch: int
    n: int
    k: int | str  # an int, or "rows": a [B] tensor with 0, 1, N and more than N among its values
    scores: str = "ties"  # "ties": few distinct values; "normal"; "special": +-inf, -0.0, tiny and huge values
    valid: str | None = None  # None; "pad": left padding, holes and a batch row with nothing valid
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        parts = [f"B{self.batch}-N{self.n}-k{self.k}", self.scores, str(self.dtype).removeprefix("torch.")]
        return "-".join(parts + ([f"valid-{self.valid}"] if self.valid else []))


def make_inputs(case: Case, device: str = "cpu") -> tuple:
    """(scores, k, tensors, valid) drawn fresh for `case`."""
    g = generator(zlib.crc32(case.id.encode()))
    shape = (case.batch, case.n)
    if case.scores == "ties":
        scores = torch.randint(-3, 4, shape, generator=g).float()
    elif case.scores == "special":
        pool = torch.tensor([float("-inf"), float("inf"), -0.0, 0.0, 1e-40, -1e-40, 3e38, -3e38, 1.0, -1.0])
        scores = pool[torch.randint(0, len(pool), shape, generator=g)]
    else:
        scores = torch.randn(shape, generator=g)
    scores = scores.to(case.dtype)
    k = torch.tensor([0, 1, case.n, case.n + 5, 3, case.n // 2][: case.batch]) if case.k == "rows" else case.k
    valid = None
    if case.valid == "pad":
        valid = torch.rand(shape, generator=g) > 0.25
        valid[0, : case.n // 3] = False
        if case.batch > 2:
            valid[2] = False
    tensors = (
        randn(case.batch, case.n, 6, gen=g, dtype=torch.bfloat16),  # hidden states
        torch.arange(case.n).repeat(case.batch, 1) + 100,  # positions, int64
        torch.rand(case.batch, case.n, 3, generator=g) > 0.5,  # bool
        randn(case.batch, 2, case.n, 3, gen=g).transpose(1, 2),  # a non-contiguous [B, N, 2, 3] view
        randn(case.batch, case.n, gen=g, dtype=torch.float16),  # a fifth: a second gather launch
    )
    to = {"device": device}
    valid = valid.to(**to) if valid is not None else None
    k = k.to(**to) if isinstance(k, torch.Tensor) else k
    return scores.to(**to), k, tuple(t.to(**to) for t in tensors), valid


CASES = [
    Case(3, 37, 5),
    Case(2, 37, 1),
    Case(2, 37, 37),  # k = N
    Case(2, 37, 50),  # k > N
    Case(2, 37, 0),
    Case(1, 1, 1),
    Case(3, 41, "rows", valid="pad"),
    Case(3, 64, 9, valid="pad"),  # capped by the valid count, and a row with none
    Case(2, 53, 12, scores="special"),
    Case(2, 53, 20, scores="special", valid="pad"),
    Case(2, 29, 7, scores="normal", dtype=torch.float16),
    Case(2, 29, 7, scores="ties", dtype=torch.bfloat16),
    Case(2, 29, 7, scores="ties", dtype=torch.int64),
    Case(2, 29, 7, scores="normal", dtype=torch.float64),
    Case(1, 4100, 40, scores="normal"),  # a row across many warps; a long bisection
    Case(2, 4100, 25, scores="ties", valid="pad"),
]


# -- the reference against a naive loop ---------------------------------------------------------------


def naive_topk(scores, k, valid):
    """Per row: sort valid positions by (score desc, index asc), take k, sort ascending; pad with (0, False)."""
    batch, n = scores.shape
    rows = []
    for b in range(batch):
        want = int(k[b]) if isinstance(k, torch.Tensor) else k
        cands = [j for j in range(n) if valid is None or bool(valid[b, j])]
        ranked = sorted(cands, key=lambda j: (-float(scores[b, j]), j))
        rows.append(sorted(ranked[: max(0, min(want, n))]))
    width = max(len(r) for r in rows)
    indices = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64).reshape(batch, width)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows], dtype=torch.bool)
    mask = mask.reshape(batch, width)
    return indices, mask


@pytest.mark.parametrize("case", [c for c in CASES if c.n < 100], ids=lambda c: c.id)
def test_reference_matches_naive_loop(case):
    scores, k, tensors, valid = make_inputs(case)
    indices, mask = naive_topk(scores.float(), k, valid)
    out = topk_gather_reference(scores, k, *tensors, valid=valid)
    assert_equal(out.indices, indices, "indices")
    assert_equal(out.mask, mask, "mask")
    for i, (t, got) in enumerate(zip(tensors, out.gathered, strict=True)):
        want = torch.stack([t[b, indices[b]] for b in range(t.shape[0])])  # [B, K, ...] by plain indexing
        assert_equal(got, want, f"gathered[{i}]")


def test_reference_ranks_valid_minus_inf_before_invalid():
    scores = torch.tensor([[0.0, float("-inf"), 5.0, float("-inf")]])
    valid = torch.tensor([[False, True, True, True]])
    out = topk_gather_reference(scores, 3, valid=valid)
    assert out.indices.tolist() == [[1, 2, 3]] and out.mask.all()


def test_reference_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"tensors\[0\] must have shape"):
        topk_gather_reference(torch.zeros(2, 5), 1, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="k must have shape"):
        topk_gather_reference(torch.zeros(2, 5), torch.ones(3, dtype=torch.long))


# -- Triton against the reference -----------------------------------------------------------------------


def check_same(actual, expected) -> None:
    assert_equal(actual.indices, expected.indices, "indices")
    assert_equal(actual.mask, expected.mask, "mask")
    assert len(actual.gathered) == len(expected.gathered)
    for i, (got, want) in enumerate(zip(actual.gathered, expected.gathered, strict=True)):
        assert_equal(got, want, f"gathered[{i}]")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case):
    scores, k, tensors, valid = make_inputs(case)
    n_tensors = 5 if case.n < 1000 else 2  # long rows: keep the interpreter's gather short
    actual = kernels.topk_gather(scores, k, *tensors[:n_tensors], valid=valid, backend="triton")
    check_same(actual, topk_gather_reference(scores, k, *tensors[:n_tensors], valid=valid))


@pytest.mark.parametrize("case", [c for c in CASES if 1 < c.n < 100][::2], ids=lambda c: c.id)
def test_triton_matches_reference_across_chunks(case, monkeypatch):
    """Rows read in 16-element chunks: ties and slots must carry from chunk to chunk."""
    from vtc.kernels import _triton_select

    monkeypatch.setattr(_triton_select, "MAX_SINGLE", 8)
    monkeypatch.setattr(_triton_select, "MAX_CHUNK", 16)
    scores, k, tensors, valid = make_inputs(case)
    actual = kernels.topk_gather(scores, k, *tensors[:2], valid=valid, backend="triton")
    check_same(actual, topk_gather_reference(scores, k, *tensors[:2], valid=valid))


def test_triton_without_tensors_and_empty_batch():
    scores = torch.randn(0, 7)
    check_same(kernels.topk_gather(scores, 3, backend="triton"), topk_gather_reference(scores, 3))
    scores = torch.randn(2, 9)
    check_same(kernels.topk_gather(scores, 4, backend="triton"), topk_gather_reference(scores, 4))


# -- on a GPU ---------------------------------------------------------------------------------------------

GPU_CASES = [
    Case(1, 650, 64, scores="normal"),  # LLaVA-1.5: 576 visual tokens among 650
    Case(4, 2990, 320, scores="ties", valid="pad"),  # LLaVA-NeXT, padded batch
    Case(2, 32768, 2048, scores="normal"),  # video
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_triton_matches_reference(case):
    device = cuda_device()
    scores, k, tensors, valid = make_inputs(case, device=device)
    with kernels.record() as rec:
        actual = kernels.topk_gather(scores, k, *tensors, valid=valid)  # auto must pick Triton on CUDA
    assert rec == {"topk_gather": "triton"}
    check_same(actual, topk_gather_reference(scores, k, *tensors, valid=valid))


def test_as_mask_keeps_a_pick_of_position_zero_when_other_rows_pick_more():
    """Row 0 picks only position 0; its unused slots also hold 0 and must not clear the real pick."""
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    picks = topk_gather_reference(scores, torch.tensor([1, 3]))
    assert picks.indices[0].tolist() == [0, 0, 0] and picks.mask[0].tolist() == [True, False, False]
    assert picks.as_mask(4).tolist() == [[True, False, False, False], [False, True, True, True]]
