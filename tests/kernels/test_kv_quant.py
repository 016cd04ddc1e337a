"""``kv_quantize`` / ``kv_dequantize``: the reference against a naive loop and its error bound, Triton bit for bit."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch
from kernel_testing import DTYPES, assert_equal, cuda_device, generator

from vtc import kernels
from vtc.kernels import dispatch
from vtc.kernels.kv_quant.reference import (
    QuantizedKV,
    kv_dequantize_reference,
    kv_quantize_reference,
    unpack_codes,
)

BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Case:
    """One quantisation call; ``id`` reads like it.

    ``layout``: ``"contiguous"``; ``"rows"``: rows of a wider tensor (row stride above D); ``"strided"``: a
    transposed view whose channels are not adjacent in memory.
    """

    shape: tuple[int, ...]
    bits: int
    group: int
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape}-b{self.bits}-g{self.group}-{str(self.dtype).removeprefix('torch.')}-{self.layout}"


def make_x(case: Case, device: str = "cpu") -> torch.Tensor:
    """Fresh seeded values for `case`: normal, scaled per token, with an outlier channel (as keys have)."""
    g = generator(zlib.crc32(case.id.encode()))
    *lead, dim = case.shape
    if case.layout == "strided":
        x = torch.randn(*lead[:-1], dim, lead[-1], generator=g).transpose(-1, -2)
    elif case.layout == "rows":
        x = torch.randn(*lead, dim + 5, generator=g)[..., 3 : 3 + dim]
    else:
        x = torch.randn(*case.shape, generator=g)
    x = x * 2.0 ** torch.randint(-3, 4, (*lead, 1), generator=g).float()
    if dim > 1:
        x[..., 1] *= 20.0
    return x.to(case.dtype).to(device)


CASES = [
    *(Case((3, 5, 64), b, 32, d) for b in BITS for d in DTYPES),  # ZipCache's group mode
    *(Case((2, 3, 7, 48), b, 12, torch.bfloat16) for b in BITS),  # [B, H, L, d], groups not a power of two
    Case((96,), 4, 96),  # one token, one group (a whole-token group)
    Case((5, 40), 8, 5, torch.float16),  # 8 bits, odd groups
    Case((9, 128), 2, 128, torch.bfloat16),  # per token over the head dim
    Case((4, 6, 32), 4, 8, torch.float16, layout="rows"),
    Case((3, 4, 32), 2, 16, torch.float32, layout="strided"),
    Case((0, 64), 4, 32),  # no tokens
]


def triton_quantize(x: torch.Tensor, bits: int, group: int) -> QuantizedKV:
    return kernels.kv_quantize(x, bits, group, backend="triton")


def assert_same_packed(actual: QuantizedKV, expected: QuantizedKV) -> None:
    assert_equal(actual.data, expected.data, "data")
    assert_equal(actual.scale, expected.scale, "scale")
    assert_equal(actual.zero, expected.zero, "zero")
    assert (actual.bits, actual.group_size, actual.shape, actual.dtype) == (
        expected.bits,
        expected.group_size,
        expected.shape,
        expected.dtype,
    )


# -- the reference: the format, a naive loop, the error bound ---------------------------------------------


def test_layout_of_the_packed_bytes():
    """Codes sit low bits first: four 2-bit codes 0, 1, 2, 3 make the byte 0b11_10_01_00."""
    q = kv_quantize_reference(torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.0, 2.0, 1.0, 0.0]]), 2, 8)
    assert q.scale.tolist() == [[1.0]] and q.zero.tolist() == [[0.0]]
    assert q.data.tolist() == [[0b11_10_01_00, 0b00_01_10_11]]
    q = kv_quantize_reference(torch.tensor([1.0, 16.0]), 4, 2)  # step 1, codes 0 and 15
    assert q.data.tolist() == [0xF0]
    assert q.nbytes == 1 + 4 + 4


def naive_quantize(x: np.ndarray, bits: int, group: int) -> tuple[list[int], list[float], list[float]]:
    """The contract for one fp32 / fp16 token, one group and one element at a time in numpy scalars."""
    f32, store = np.float32, x.dtype.type
    qmax, per = 2**bits - 1, 8 // bits
    codes, scales, zeros = [], [], []
    for start in range(0, len(x), group):
        vals = [f32(v) for v in x[start : start + group]]
        low, high = min(vals), max(vals)
        scale = f32(store(max(f32(f32(high - low) / f32(qmax)), f32(np.finfo(store).tiny))))
        inv = f32(f32(1.0) / scale)
        codes += [int(min(max(np.floor(f32(f32(f32(v - low) * inv) + f32(0.5))), 0), qmax)) for v in vals]
        scales.append(float(scale))
        zeros.append(float(low))
    data = [sum(codes[i + j] << (j * bits) for j in range(per)) for i in range(0, len(codes), per)]
    return data, scales, zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits", BITS)
def test_reference_matches_naive_loop(bits, dtype):
    x = make_x(Case((3, 24), bits, 12, dtype))
    q = kv_quantize_reference(x, bits, 12)
    for row in range(x.shape[0]):
        data, scales, zeros = naive_quantize(x[row].numpy(), bits, 12)
        assert q.data[row].tolist() == data
        assert q.scale[row].tolist() == scales
        assert q.zero[row].tolist() == zeros


def error_bound(x: torch.Tensor, q: QuantizedKV, x_hat: torch.Tensor) -> torch.Tensor:
    """Largest ``|x - x_hat|`` the contract allows, per element (float64).

    Half a step (rounding to the nearest code), plus every rounding on the way, each at most one unit
    roundoff ``u`` of its format times the magnitude it rounds:

    - the code: ``(x - zero) * inv + 0.5`` rounds 4 times (``inv`` included) at a magnitude up to
      ``qmax + 1`` steps, which can move a value across a rounding boundary by ``4 u32 (qmax + 1)`` steps;
    - the dequantisation ``code * scale + zero`` rounds twice in fp32, at magnitudes up to ``qmax * scale``
      and ``|x_hat32|``, with ``|x_hat32| <= |zero| + qmax * scale``;
    - the final rounding to the dtype: ``u_d |x_hat32|``, or half the smallest subnormal below the normal range.
    """
    u32 = torch.finfo(torch.float32).eps / 2
    u_d = torch.finfo(q.dtype).eps / 2
    qmax = 2**q.bits - 1
    lead, dim = tuple(q.shape[:-1]), q.shape[-1]
    per_channel = (*lead, dim // q.group_size, q.group_size)
    scale = q.scale.double()[..., None].expand(per_channel).reshape(q.shape)
    zero = q.zero.double()[..., None].expand(per_channel).reshape(q.shape)
    x_hat32 = zero.abs() + qmax * scale
    subnormal = torch.finfo(q.dtype).tiny * torch.finfo(q.dtype).eps / 2
    return (
        scale / 2
        + u32 * 4 * (qmax + 1) * scale
        + u32 * (qmax * scale + x_hat32)
        + torch.maximum(u_d * x_hat32, torch.full_like(scale, subnormal))
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_round_trip_error_within_half_a_step(case):
    x = make_x(case)
    q = kv_quantize_reference(x, case.bits, case.group)
    x_hat = kv_dequantize_reference(q)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    err = (x.double() - x_hat.double()).abs()
    over = err > error_bound(x, q, x_hat)
    assert not bool(over.any()), f"{int(over.sum())} elements beyond the bound; worst error {err.max().item():.3g}"


@pytest.mark.parametrize("bits", BITS)
def test_each_group_spans_the_codes_and_the_bound_is_tight(bits):
    """Every group's minimum gets code 0 and its maximum code ``qmax``; errors reach nearly half a step."""
    x = make_x(Case((64, 128), bits, 32))
    q = kv_quantize_reference(x, bits, 32)
    codes = unpack_codes(q.data, bits).reshape(64, 4, 32).long()
    groups = x.reshape(64, 4, 32)
    assert torch.equal(codes.gather(2, groups.argmin(dim=2, keepdim=True)), torch.zeros(64, 4, 1, dtype=torch.long))
    assert torch.equal(codes.gather(2, groups.argmax(dim=2, keepdim=True)), torch.full((64, 4, 1), 2**bits - 1))
    err = (x - kv_dequantize_reference(q)).abs().reshape(64, 4, 32)
    assert float((err.amax(dim=2) / q.scale).max()) > 0.45, "no element came near half a step: the bound is loose"


def test_more_bits_never_err_more():
    x = make_x(Case((16, 64), 2, 32, torch.float16))
    worst = [(x - kv_dequantize_reference(kv_quantize_reference(x, b, 32))).abs().amax(dim=-1) for b in BITS]
    assert bool((worst[1] <= worst[0]).all()) and bool((worst[2] <= worst[1]).all())


# -- Triton against the reference, bit for bit ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(case):
    x = make_x(case)
    expected = kv_quantize_reference(x, case.bits, case.group)
    actual = triton_quantize(x, case.bits, case.group)
    assert_same_packed(actual, expected)
    assert_equal(kernels.kv_dequantize(expected, backend="triton"), kv_dequantize_reference(expected), "x_hat")


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == torch.bfloat16], ids=lambda c: c.id)
def test_triton_matches_reference_in_large_tiles(case, monkeypatch):
    """The 4096-value tiles of large tensors, here on small ones: many groups per program, the last one partial."""
    from vtc.kernels.kv_quant import triton_impl

    monkeypatch.setattr(triton_impl, "LARGE_FROM", 0)
    x = make_x(case)
    expected = kv_quantize_reference(x, case.bits, case.group)
    assert_same_packed(triton_quantize(x, case.bits, case.group), expected)
    assert_equal(kernels.kv_dequantize(expected, backend="triton"), kv_dequantize_reference(expected), "x_hat")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_constant_groups_round_trip_exactly(dtype, backend):
    """A group whose values are all equal has no range: its step is the dtype's smallest normal, no NaN."""
    x = make_x(Case((4, 32), 4, 8, dtype))
    x[0, :8] = 0.0
    x[1, 8:16] = -3.25
    x[2, 16:24] = 60000.0 if dtype == torch.float16 else 1e30
    x[3] = 7.0  # a whole token
    for bits in BITS:
        q = kernels.kv_quantize(x, bits, 8, backend=backend)
        x_hat = kernels.kv_dequantize(q, backend=backend)
        assert not bool(x_hat.isnan().any())
        flat = [x_hat[0, :8], x_hat[1, 8:16], x_hat[2, 16:24], x_hat[3]]
        for got, want in zip(flat, [x[0, :8], x[1, 8:16], x[2, 16:24], x[3]], strict=True):
            assert torch.equal(got, want)
        assert q.scale[0, 0].item() == torch.finfo(dtype).tiny


# -- bad calls and the dispatcher ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments_raise_value_error_on_every_backend(backend):
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\); got 3"):
        kernels.kv_quantize(x, 3, 8, backend=backend)
    with pytest.raises(ValueError, match=r"last dim of x \(32\) must be divisible by group_size \(12\)"):
        kernels.kv_quantize(x, 4, 12, backend=backend)
    with pytest.raises(ValueError, match="group_size must be a multiple of 4 at 2 bits"):
        kernels.kv_quantize(x, 2, 2, backend=backend)
    with pytest.raises(ValueError, match=r"x must be one of .*got torch.float64"):
        kernels.kv_quantize(x.double(), 4, 8, backend=backend)
    q = kv_quantize_reference(x, 4, 8)
    with pytest.raises(ValueError, match=r"QuantizedKV.scale must be \[2, 4\]"):
        kernels.kv_dequantize(dataclasses.replace(q, scale=q.scale[:, :2]), backend=backend)
    with pytest.raises(ValueError, match="takes the QuantizedKV"):
        kernels.kv_dequantize(x, backend=backend)


def test_auto_on_cpu_takes_the_reference_and_forcing_takes_triton(monkeypatch):
    x = torch.randn(3, 16)
    with kernels.record() as rec:
        q = kernels.kv_quantize(x, 4, 8)
        kernels.kv_dequantize(q)
    assert rec == {"kv_quantize": "torch", "kv_dequantize": "torch"}
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with kernels.record() as rec:
        kernels.kv_dequantize(kernels.kv_quantize(x, 4, 8))
    assert rec == {"kv_quantize": "triton", "kv_dequantize": "triton"}
    with kernels.use("torch"), kernels.record() as rec:
        kernels.kv_dequantize(kernels.kv_quantize(x, 4, 8))
    assert rec == {"kv_quantize": "torch", "kv_dequantize": "torch"}


def test_explicit_triton_that_cannot_run_says_why(monkeypatch):
    with pytest.raises(RuntimeError, match="groups above 8192 channels"):
        kernels.kv_quantize(torch.zeros(1, 16384), 8, 16384, backend="triton")
    q = kv_quantize_reference(torch.randn(2, 16), 4, 8)
    monkeypatch.delenv(dispatch.INTERPRET_VAR)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # the QuantizedKV's tensors are on the CPU
        kernels.kv_dequantize(q, backend="triton")


# -- on a GPU ---------------------------------------------------------------------------------------------


# Keys of one Qwen2.5-VL-7B layer for an 8k-token video (bf16), LLaVA-1.5 keys (fp16), 1M values.
GPU_CASES = [
    *(Case((1, 4, 8192, 128), b, 32, torch.bfloat16) for b in BITS),
    Case((1, 32, 650, 128), 4, 128, torch.float16),
    Case((8192, 128), 2, 32, torch.bfloat16, layout="rows"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_triton_matches_reference(case):
    device = cuda_device()
    x = make_x(case, device=device)
    with kernels.record() as rec:
        q = kernels.kv_quantize(x, case.bits, case.group)  # auto must pick Triton on CUDA
        x_hat = kernels.kv_dequantize(q)
    assert rec == {"kv_quantize": "triton", "kv_dequantize": "triton"}
    assert_same_packed(q, kv_quantize_reference(x, case.bits, case.group))
    assert_equal(x_hat, kv_dequantize_reference(q), "x_hat")
