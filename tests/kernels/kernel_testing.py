"""What the kernel tests share: the tolerance table, a verbose comparison, seeded inputs, the GPU marker.

Indices and masks are compared exactly; floating-point values by ``TOLERANCE`` keyed by the input
dtype, the one table of the kernel tests (docs/KERNELS.md repeats it). Both the Triton kernels and the
references upcast inputs to fp32 and accumulate in fp32, so a kernel is compared with the fp32
reference of the *same* fp16 / bf16 values: the only difference is fp32 summation order (and the GPU's
``exp2``), which does not depend on the input dtype. The entries are therefore equal, and each is about
30x the largest error seen on the CPU interpreter, which leaves room for GPU accumulation orders.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vtc.kernels.dispatch import interpreting

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Tol:
    """``|actual - expected| <= atol + rtol * |expected|``, elementwise."""

    rtol: float
    atol: float


TOLERANCE: dict[torch.dtype, Tol] = {
    torch.float32: Tol(rtol=1e-5, atol=1e-6),
    torch.float16: Tol(rtol=1e-5, atol=1e-6),
    torch.bfloat16: Tol(rtol=1e-5, atol=1e-6),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "values") -> None:
    """Compare with the tolerance of input `dtype`; on failure name the worst elements."""
    tol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    bad = (a - e).abs() > tol.atol + tol.rtol * e.abs()
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        worst = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.8g} vs {e[tuple(i)].item():.8g}" for i in where)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond rtol={tol.rtol}, atol={tol.atol} "
            f"for {dtype} (max abs diff {(a - e).abs().max().item():.3g}); first: {worst}"
        )


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Exact equality (bit patterns for floats, so -0.0 and NaN payloads count); names the first differences."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, e = a.view(word), e.view(word)
    diff = a != e
    if bool(diff.any()):
        where = diff.nonzero()[:5].tolist()
        first = ", ".join(f"{tuple(i)}: {actual[tuple(i)].item()} vs {expected[tuple(i)].item()}" for i in where)
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.numel()} elements differ; first: {first}")


def generator(seed: int) -> torch.Generator:
    """A seeded CPU generator: every test draws fresh inputs, reproducibly."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def cuda_device() -> str:
    """The CUDA device for ``gpu`` tests (their marker deselects them by default)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if interpreting():
        pytest.skip("TRITON_INTERPRET is set; run the GPU tests with TRITON_INTERPRET=0")
    return "cuda"
