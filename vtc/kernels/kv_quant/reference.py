"""Torch reference of ``kv_quantize`` / ``kv_dequantize``: group-wise asymmetric min-max quantisation.

ZipVL keeps the KV cache in mixed precision (important tokens at 4 bits, the rest at 2, as its authors'
ZipCache does); this is the storage format under it. Each token's last dim ``D`` is cut into groups of
``group_size`` channels; a group keeps its minimum as the zero point and ``(max - min) / (2**bits - 1)``
as the step, and its values become ``bits``-bit codes packed ``8 // bits`` to a byte.

The arithmetic is spelled out operation by operation (fp32, one rounding each, no fused multiply-add)
because the Triton kernels perform the same operations and must produce the same bytes.
"""

from __future__ import annotations

import dataclasses

import torch

from vtc.kernels._checks import check_same_device, fail

OP = "kv_quant"
BITS = (2, 4, 8)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """A tensor ``[..., D]`` quantised per token in groups along ``D``.

    Attributes:
        data: ``uint8 [..., D * bits // 8]``: the codes, ``8 // bits`` per byte. Code ``d`` of a row sits in
            byte ``d // (8 // bits)`` at bits ``(d % (8 // bits)) * bits`` upwards (the first code in the
            low bits).
        scale: ``[..., D // group_size]`` in ``dtype``: each group's step, at least the smallest normal
            number of ``dtype`` (so a constant group needs no special case and never divides by zero).
        zero: ``[..., D // group_size]`` in ``dtype``: each group's minimum (exact: it is one of the inputs).
        bits: 2, 4 or 8.
        group_size: channels per group.
        shape: the shape of the quantised tensor.
        dtype: its dtype, which ``kv_dequantize`` returns.
    """

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes, scales and zero points): what a quantised KV cache costs."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))


def check_quantize_args(x: torch.Tensor, bits: int, group_size: int) -> None:
    """Raise ``ValueError`` for a ``kv_quantize`` call outside the contract (dtype, bits, group size)."""
    if not isinstance(x, torch.Tensor):
        fail(OP, f"x must be a tensor; got {type(x).__name__}.")
    if x.dtype not in DTYPES:
        fail(OP, f"x must be one of {', '.join(map(str, DTYPES))}; got {x.dtype}. Cast it first.")
    if x.dim() < 1:
        fail(OP, "x must have at least one dim (the channels, last); got a scalar.")
    if isinstance(bits, bool) or bits not in BITS:
        fail(OP, f"bits must be one of {BITS}; got {bits!r}.")
    per_byte = 8 // bits
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        fail(OP, f"group_size must be a positive int; got {group_size!r}.")
    if group_size % per_byte:
        fail(
            OP,
            f"group_size must be a multiple of {per_byte} at {bits} bits (a byte holds {per_byte} codes of one "
            f"group); got {group_size}.",
        )
    dim = x.shape[-1]
    if dim % group_size:
        fail(OP, f"the last dim of x ({dim}) must be divisible by group_size ({group_size}); pick a divisor of {dim}.")


def check_dequantize_args(q: QuantizedKV) -> None:
    """Raise ``ValueError`` unless the parts of `q` agree with each other (as ``kv_quantize`` made them)."""
    if not isinstance(q, QuantizedKV):
        fail(OP, f"kv_dequantize takes the QuantizedKV that kv_quantize returned; got {type(q).__name__}.")
    if q.dtype not in DTYPES or q.bits not in BITS or q.group_size < 1 or len(q.shape) < 1:
        fail(OP, f"QuantizedKV has dtype {q.dtype}, bits {q.bits}, group_size {q.group_size}, shape {q.shape}.")
    lead, dim = tuple(q.shape[:-1]), q.shape[-1]
    if dim % q.group_size or q.group_size % (8 // q.bits):
        fail(OP, f"QuantizedKV's last dim {dim} does not split into groups of {q.group_size} at {q.bits} bits.")
    want = {
        "data": ((*lead, dim * q.bits // 8), torch.uint8),
        "scale": ((*lead, dim // q.group_size), q.dtype),
        "zero": ((*lead, dim // q.group_size), q.dtype),
    }
    for name, (shape, dtype) in want.items():
        t = getattr(q, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            fail(OP, f"QuantizedKV.{name} must be {list(shape)} {dtype}; got {got}.")
    check_same_device(OP, data=q.data, scale=q.scale, zero=q.zero)


def scale_floor(dtype: torch.dtype) -> float:
    """The smallest step stored: the smallest normal number of `dtype` (fp16: 6.1e-5)."""
    return torch.finfo(dtype).tiny


def kv_quantize_reference(x: torch.Tensor, bits: int, group_size: int) -> QuantizedKV:
    """Quantise `x` ``[..., D]`` per token, in groups of `group_size` channels, to `bits`-bit codes.

    Per group, in fp32 with the stored (rounded) step and zero point, so that dequantising is consistent:

    - ``zero = min(group)``, ``scale = dtype(max(fp32(max - min) / (2**bits - 1), tiny(dtype)))``;
    - ``inv = 1 / scale``; ``code = clamp(floor((x - zero) * inv + 0.5), 0, 2**bits - 1)``.

    Every element then dequantises to within ``scale / 2`` of its value, up to fp32 rounding and the final
    rounding to ``dtype`` (see docs/KERNELS.md). Values must be finite (NaN and inf are not supported).

    Args:
        x: ``[..., D]`` fp16, bf16 or fp32 (any strides).
        bits: 2, 4 or 8.
        group_size: channels per group; divides ``D`` and is a multiple of ``8 // bits``. ``group_size = D``
            quantises each token as one group.

    Returns:
        ``QuantizedKV`` with contiguous ``data``, ``scale`` and ``zero``.
    """
    check_quantize_args(x, bits, group_size)
    lead, dim = x.shape[:-1], x.shape[-1]
    qmax = 2**bits - 1
    per_byte = 8 // bits
    groups = x.reshape(*lead, dim // group_size, group_size).float()  # [..., G, g]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [..., G]
    # Divide by a tensor, not a Python number: on CUDA, torch turns ``t / number`` into ``t * (1 / number)``,
    # one rounding more than the IEEE division the kernel (and torch on the CPU) performs.
    steps = torch.full((), qmax, dtype=torch.float32, device=x.device)
    scale = ((high - low) / steps).clamp_min(scale_floor(x.dtype)).to(x.dtype)
    zero = low.to(x.dtype)  # exact: the minimum is one of x's values
    inv = torch.reciprocal(scale.float())
    shifted = (groups - zero.float()[..., None]) * inv[..., None] + 0.5  # three roundings, as the kernel
    codes = shifted.floor().clamp(0, qmax).to(torch.uint8).reshape(*lead, dim // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=x.device)  # [per_byte]
    data = (codes << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is an or
    return QuantizedKV(data.contiguous(), scale.contiguous(), zero.contiguous(), bits, group_size, x.shape, x.dtype)


def unpack_codes(data: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of packed ``data`` ``[..., B]`` as ``uint8 [..., B * 8 // bits]``, in channel order."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=data.device)  # [per_byte]
    codes = (data[..., None] >> shifts) & (2**bits - 1)  # [..., B, per_byte]
    return codes.reshape(*data.shape[:-1], data.shape[-1] * (8 // bits))


def kv_dequantize_reference(q: QuantizedKV) -> torch.Tensor:
    """``code * scale + zero`` in fp32 (two roundings), rounded to ``q.dtype``: ``[..., D]``, contiguous."""
    check_dequantize_args(q)
    lead, dim = tuple(q.shape[:-1]), q.shape[-1]
    codes = unpack_codes(q.data, q.bits).reshape(*lead, dim // q.group_size, q.group_size).float()  # [..., G, g]
    x_hat = codes * q.scale.float()[..., None] + q.zero.float()[..., None]
    return x_hat.to(q.dtype).reshape(q.shape)
