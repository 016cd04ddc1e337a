"""Triton ``kv_quantize`` / ``kv_dequantize``: one pass over the data each, bit for bit the reference.

Both are pure streaming: quantising reads every value once and writes codes plus two numbers per group;
dequantising reads those and writes every value once. A program owns a tile of whole consecutive groups
(1024 or 4096 values) as ``[groups, channels]`` (a group size that is not a power of two is padded and
masked), so loads and stores are contiguous and a group's minimum and maximum are reductions in registers;
packing reshapes the codes to ``[groups, bytes, codes per byte]`` and shifts and sums the last axis,
unpacking does the reverse.

Exactness: every fp32 operation is the reference's, in its order, and the launches pass
``enable_fp_fusion=False`` so the compiler cannot fuse a multiply and an add into one rounding; the step's
reciprocal is an IEEE division (``div_rn``), whatever Triton lowers ``/`` to (it has been approximate). bf16 results are
rounded to nearest-even by the GPU's cast; the CPU interpreter truncates fp32 -> bf16 casts, so there
(``BF16_BITS``) the kernels round with integer operations instead, which equal the cast for finite values.
"""

# ruff: noqa: N803, N806  (Triton's convention: compile-time constants are upper case)

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels._triton_select import next_pow2
from vtc.kernels.dispatch import interpreting
from vtc.kernels.kv_quant.reference import (
    QuantizedKV,
    check_dequantize_args,
    check_quantize_args,
    scale_floor,
)

#: Whether these kernels were defined for the interpreter (``TRITON_INTERPRET`` is read at definition).
INTERPRETED = interpreting()
#: Largest group (channels) one program holds in registers; larger groups take the reference.
MAX_GROUP = 8192
#: Values per program. A large tensor takes 4096-value tiles: many bytes in flight per thread. Below
#: ``LARGE_FROM`` values, 1024-value tiles make four times the programs, so that a small tensor (1M
#: values, 2 MB in bf16) still spreads over every SM of an H100 / H200 instead of about two per SM.
TILE_LARGE = 4096
TILE_SMALL = 1024
LARGE_FROM = 4 * 2**20
#: ``KIND`` of the stored dtype in the kernels.
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _round_store(ptr, offs, v, mask, KIND: tl.constexpr, BF16_BITS: tl.constexpr):
    """Store fp32 `v` at `ptr + offs` in the output dtype, rounded to nearest-even; return the stored value as fp32.

    With `BF16_BITS`, bf16 (``KIND == 2``) is rounded with integer operations and stored through an int16
    view of the output (see ``_stored``).
    """
    if KIND == 0:
        tl.store(ptr + offs, v, mask=mask)
        return v
    elif KIND == 1:
        h = v.to(tl.float16)
        tl.store(ptr + offs, h, mask=mask)
        return h.to(tl.float32)
    elif not BF16_BITS:
        h = v.to(tl.bfloat16)
        tl.store(ptr + offs, h, mask=mask)
        return h.to(tl.float32)
    else:
        b = v.to(tl.int32, bitcast=True)
        top = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # round the low 16 bits away, ties to even
        tl.store(ptr + offs, top.to(tl.int16), mask=mask)
        return (top << 16).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_kernel(
    x_ptr,
    data_ptr,
    scale_ptr,
    zero_ptr,
    n_groups,
    groups_per_row,
    stride_xr,
    floor,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BYTES_P2: tl.constexpr,
    GROUPS_BLOCK: tl.constexpr,
    KIND: tl.constexpr,
    BF16_BITS: tl.constexpr,
    DENSE: tl.constexpr,
):
    """Program: `GROUPS_BLOCK` consecutive groups (row-major over ``[rows, groups per row]``).

    `DENSE`: the rows are back to back (row stride D), so group ``g`` starts at ``g * GROUP`` and no
    64-bit division splits it into row and column.
    """
    PER: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = GROUP // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    grp = tl.program_id(0).to(tl.int64) * GROUPS_BLOCK + tl.arange(0, GROUPS_BLOCK)  # [GB]
    chan = tl.arange(0, BYTES_P2 * PER)  # [GP] the group's channels, padded to a power of two
    g_ok = grp < n_groups
    ok = g_ok[:, None] & (chan < GROUP)[None, :]  # [GB, GP]
    start = grp * GROUP if DENSE else (grp // groups_per_row) * stride_xr + (grp % groups_per_row) * GROUP
    src = x_ptr + start[:, None] + chan[None, :]
    x = tl.load(src, mask=ok, other=0.0).to(tl.float32)  # [GB, GP]
    low = tl.min(tl.where(ok, x, float("inf")), axis=1)  # [GB]
    high = tl.max(tl.where(ok, x, float("-inf")), axis=1)
    low, high = tl.where(g_ok, low, 0.0), tl.where(g_ok, high, 0.0)  # past-the-end groups: finite, never stored
    step = tl.maximum(tl.math.div_rn(high - low, tl.full([GROUPS_BLOCK], QMAX, tl.float32)), floor)
    step = _round_store(scale_ptr, grp, step, g_ok, KIND, BF16_BITS)
    zero = _round_store(zero_ptr, grp, low, g_ok, KIND, BF16_BITS)  # exact: low is one of the inputs
    inv = tl.math.div_rn(tl.full([GROUPS_BLOCK], 1.0, tl.float32), step)
    shifted = (x - zero[:, None]) * inv[:, None] + 0.5
    # shifted >= 0.5 (x >= zero exactly, inv > 0), so truncation is the reference's floor and only the top
    # clamp can bind: one conversion and one integer min per value instead of four operations.
    codes = tl.minimum(shifted.to(tl.int32), QMAX)
    codes = tl.reshape(codes, [GROUPS_BLOCK, BYTES_P2, PER])  # channel c -> byte c // PER, slot c % PER
    packed = tl.sum(codes << (tl.arange(0, PER) * BITS)[None, None, :], axis=2)  # disjoint bits: sum = or
    byte = tl.arange(0, BYTES_P2)
    dst = data_ptr + (grp * BYTES)[:, None] + byte[None, :]  # data is contiguous [groups, BYTES]
    tl.store(dst, packed.to(tl.uint8), mask=g_ok[:, None] & (byte < BYTES)[None, :])


@triton.jit
def _dequantize_kernel(
    data_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    n_groups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BYTES_P2: tl.constexpr,
    GROUPS_BLOCK: tl.constexpr,
    KIND: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """Program: `GROUPS_BLOCK` consecutive groups of the contiguous ``[groups, GROUP]`` output."""
    PER: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = GROUP // PER
    grp = tl.program_id(0).to(tl.int64) * GROUPS_BLOCK + tl.arange(0, GROUPS_BLOCK)  # [GB]
    byte = tl.arange(0, BYTES_P2)  # [BP]
    g_ok = grp < n_groups
    packed = tl.load(data_ptr + (grp * BYTES)[:, None] + byte[None, :], mask=g_ok[:, None] & (byte < BYTES)[None, :])
    shifts = (tl.arange(0, PER) * BITS)[None, None, :]
    codes = (packed.to(tl.int32)[:, :, None] >> shifts) & ((1 << BITS) - 1)  # [GB, BP, PER]
    codes = tl.reshape(codes, [GROUPS_BLOCK, BYTES_P2 * PER])  # [GB, GP] in channel order
    step = tl.load(scale_ptr + grp, mask=g_ok, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + grp, mask=g_ok, other=0.0).to(tl.float32)
    x_hat = codes.to(tl.float32) * step[:, None] + zero[:, None]
    chan = tl.arange(0, BYTES_P2 * PER)
    ok = g_ok[:, None] & (chan < GROUP)[None, :]
    _round_store(out_ptr, (grp * GROUP)[:, None] + chan[None, :], x_hat, ok, KIND, BF16_BITS)


def _blocks(bits: int, group_size: int, n_values: int) -> tuple[int, int, int]:
    """``(BYTES_P2, GROUPS_BLOCK, num_warps)``: a tile of about 1024 or 4096 values (at least one whole group)."""
    tile = TILE_LARGE if n_values >= LARGE_FROM else TILE_SMALL
    bytes_p2 = next_pow2(group_size // (8 // bits))
    width = bytes_p2 * (8 // bits)  # values per group, padded
    groups_block = max(1, tile // width)
    return bytes_p2, groups_block, 8 if width > TILE_LARGE else 4


def _stored(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels store into: in the interpreter, bf16 through an int16 view (see ``_round_store``)."""
    return t.view(torch.int16) if INTERPRETED and t.dtype == torch.bfloat16 else t


def kv_quantize_triton(x: torch.Tensor, bits: int, group_size: int) -> QuantizedKV:
    """Triton implementation of ``kv_quantize`` (same contract and bytes as ``kv_quantize_reference``)."""
    check_quantize_args(x, bits, group_size)
    if group_size > MAX_GROUP:
        raise ValueError(f"kv_quant: the Triton kernel takes groups of at most {MAX_GROUP} channels.")
    lead, dim = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, dim)  # [N, D], a view when the leading dims allow it
    if dim > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    n_rows, groups_per_row = rows.shape[0], dim // group_size
    data = torch.empty(*lead, dim * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(*lead, groups_per_row, dtype=x.dtype, device=x.device)
    zero = torch.empty_like(scale)
    n_groups = n_rows * groups_per_row
    if n_groups:
        bytes_p2, groups_block, warps = _blocks(bits, group_size, x.numel())
        _quantize_kernel[(triton.cdiv(n_groups, groups_block),)](
            rows, data, _stored(scale), _stored(zero), n_groups, groups_per_row, rows.stride(0),
            scale_floor(x.dtype), BITS=bits, GROUP=group_size, BYTES_P2=bytes_p2, GROUPS_BLOCK=groups_block,
            KIND=_KIND[x.dtype], BF16_BITS=INTERPRETED, DENSE=rows.stride(0) == dim, num_warps=warps,
            enable_fp_fusion=False,
        )  # fmt: skip
    return QuantizedKV(data, scale, zero, bits, group_size, x.shape, x.dtype)


def kv_dequantize_triton(q: QuantizedKV) -> torch.Tensor:
    """Triton implementation of ``kv_dequantize`` (same contract and values as ``kv_dequantize_reference``)."""
    check_dequantize_args(q)
    if q.group_size > MAX_GROUP:
        raise ValueError(f"kv_quant: the Triton kernel takes groups of at most {MAX_GROUP} channels.")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.data.device)
    n_groups = q.scale.numel()
    if n_groups:
        bytes_p2, groups_block, warps = _blocks(q.bits, q.group_size, out.numel())
        _dequantize_kernel[(triton.cdiv(n_groups, groups_block),)](
            q.data.contiguous(), q.scale.contiguous(), q.zero.contiguous(), _stored(out), n_groups,
            BITS=q.bits, GROUP=q.group_size, BYTES_P2=bytes_p2, GROUPS_BLOCK=groups_block, KIND=_KIND[q.dtype],
            BF16_BITS=INTERPRETED, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out
