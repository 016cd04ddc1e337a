"""Triton ``attn_rows``: attention probabilities of a few rows in two passes over the keys.

A probability needs its row's softmax normaliser, which depends on every key the row may attend, so
the work splits in two passes and never forms an ``[R, Lk]`` tensor:

1. ``_row_stats_kernel`` streams all keys once with an online softmax and keeps, per (head, row), the
   running maximum ``m`` and sum ``l``. The key range is split across programs (as flash-decoding does)
   because a handful of rows against one KV head is far too little work to fill a GPU otherwise; each
   split writes its partial ``(m, l)``, ``O(heads x rows x splits)`` floats.
2. ``_probs_kernel`` owns a block of returned columns, combines the partials into each row's
   normaliser, recomputes the logits of its columns only and reduces over heads then rows in
   registers, writing nothing but the output.

GQA: a pass-1 program serves one KV head and all its query heads at once (one ``[G x R, D]`` matrix
against each key block), so K is read once per KV head and never repeated in memory. Logits live in the
log2 domain (``scale * log2(e)`` folded in) so the exponentials are ``exp2``. Inputs are fp16 / bf16 /
fp32; products accumulate in fp32 (fp32 inputs use IEEE fp32 products, not TF32).
"""

# ruff: noqa: N803  (Triton's convention: compile-time constexpr parameters are upper case)

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from vtc.kernels._triton_select import next_pow2
from vtc.kernels.attn_rows.reference import check_attn_rows_args, row_weights
from vtc.kernels.dispatch import interpreting

#: Whether these kernels were defined for the interpreter (``TRITON_INTERPRET`` is read at definition).
INTERPRETED = interpreting()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest head dim the kernels hold in registers, and largest query heads per KV head.
MAX_HEAD_DIM = 256
MAX_GROUP = 64
_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes and the key split; ``None`` fields are chosen from the shapes (see ``choose``).

    Attributes:
        splits: programs the key range of one (batch, KV head, row block) is split over in pass 1.
        key_block: keys per step of pass 1.
        row_block: rows per program in pass 1 (times the group's query heads).
        col_block: returned columns per pass-2 program.
        out_row_block: rows per step of pass 2.
    """

    splits: int | None = None
    key_block: int | None = None
    row_block: int | None = None
    col_block: int | None = None
    out_row_block: int | None = None


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, but more than one split so the combine path runs


def choose(
    config: Config | None, batch: int, hkv: int, group: int, rows: int, lk: int, cols: int, dtype, device
) -> Config:
    """Fill a ``Config``'s unset fields for these shapes.

    ``tl.dot`` wants every block dimension >= 16, so row blocks are padded up to that (wasted lanes
    cost little: the kernels are bound by reading K). fp16 / bf16 take large tiles (tensor cores);
    fp32 takes 16-wide ones, because its IEEE products run on FMA units and larger tiles spill
    registers (checked with ptxas for sm_90). Pass 1 splits keys until there are about two programs
    per SM, keeping at least four key blocks per split so the partials stay few.
    """
    c = config or Config()
    fp32 = dtype == torch.float32
    group_p = next_pow2(group)
    key_block = c.key_block or (32 if INTERPRETED else 16 if fp32 else 64)
    pairs = 16 if fp32 else 64  # (query head, row) pairs per pass-1 program
    row_block = c.row_block or max(min(next_pow2(rows), max(1, pairs // group_p)), -(-16 // group_p))
    programs = batch * hkv * triton.cdiv(rows, row_block)
    max_splits = max(1, triton.cdiv(lk, 4 * key_block))
    splits = c.splits or min(max_splits, max(1, triton.cdiv(2 * _sm_count(device), programs)), 128)
    if INTERPRETED or fp32:
        col_block, out_row_block = c.col_block or 16, c.out_row_block or 16
    else:
        col_block = c.col_block or (64 if batch * triton.cdiv(cols, 64) >= 2 * _sm_count(device) else 32)
        out_row_block = c.out_row_block or max(16, min(next_pow2(rows), 64))
    return Config(splits, key_block, row_block, col_block, out_row_block)


@triton.jit
def _row_stats_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    kvv_ptr,
    m_ptr,
    l_ptr,
    rows,
    lk,
    hkv,
    keys_per_split,
    splits,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qr,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_pb,
    stride_pr,
    stride_vb,
    stride_vl,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
    KEY_BLOCK: tl.constexpr,
    DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_KV_VALID: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (batch x KV head, row block, split): partial softmax max and sum of its keys, per (head, row)."""
    pid = tl.program_id(0)
    b = (pid // hkv).to(tl.int64)
    kv_head = pid % hkv
    split = tl.program_id(2)
    # Block rows are (group head, row) pairs, row fastest: [GROUP_P * ROW_BLOCK].
    offs_m = tl.arange(0, GROUP_P * ROW_BLOCK)
    g = offs_m // ROW_BLOCK
    r = tl.program_id(1) * ROW_BLOCK + offs_m % ROW_BLOCK
    row_ok = (g < GROUP) & (r < rows)
    head = kv_head * GROUP + g
    offs_d = tl.arange(0, DIM_P)
    d_ok = offs_d < DIM

    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + r[:, None] * stride_qr + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, DIM_P]
    if UPCAST:  # the interpreter computes bf16 arithmetic wrongly; fp32 holds fp16 / bf16 exactly
        q = q.to(tl.float32)
    if HAS_POS:
        limit = tl.load(pos_ptr + b * stride_pb + r * stride_pr, mask=row_ok, other=-1).to(tl.int64)
    else:
        limit = tl.where(row_ok, lk - 1, -1).to(tl.int64)
    start = split * keys_per_split
    # Causal rows skip keys beyond the last one any row of this block may see.
    stop = tl.minimum(tl.minimum(start + keys_per_split, lk), tl.max(limit, axis=0) + 1).to(tl.int32)

    m_i = tl.full([GROUP_P * ROW_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P * ROW_BLOCK], tl.float32)
    for key0 in range(start, stop, KEY_BLOCK):
        offs_n = key0 + tl.arange(0, KEY_BLOCK)
        key_ok = offs_n < stop
        if HAS_KV_VALID:
            key_ok = key_ok & (tl.load(kvv_ptr + b * stride_vb + offs_n * stride_vl, mask=key_ok, other=0) != 0)
        k = tl.load(
            k_ptr + b * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
            mask=key_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [KEY_BLOCK, DIM_P]
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, KEY_BLOCK], log2 domain
        allowed = key_ok[None, :] & (offs_n[None, :] <= limit[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp2 finite (NaN-free)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    out = ((b * (hkv * GROUP) + head) * rows + r) * splits + split  # [B, Hq, R, splits] contiguous
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _probs_block(
    q_ptr,
    k_ptr,
    m_ptr,
    l_ptr,
    b,
    head,
    r,
    row_ok,
    limit,
    cols,
    col_ok,
    rows,
    hq,
    splits,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qr,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    GROUP: tl.constexpr,
    SPLITS_P: tl.constexpr,
    DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``[rows, COL_BLOCK]`` probabilities of rows `r` of query head `head` at the columns `cols`."""
    offs_d = tl.arange(0, DIM_P)
    d_ok = offs_d < DIM
    q = tl.load(
        q_ptr + b * stride_qb + head * stride_qh + r[:, None] * stride_qr + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [OUT_ROW_BLOCK, DIM_P]
    # The columns' keys, from the KV head this query head reads (L2-resident after the first head).
    k_cols = tl.load(
        k_ptr + b * stride_kb + (head // GROUP) * stride_kh + cols[:, None] * stride_kl + offs_d[None, :] * stride_kd,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [COL_BLOCK, DIM_P]
    if UPCAST:
        q = q.to(tl.float32)
        k_cols = k_cols.to(tl.float32)
    s = tl.dot(q, tl.trans(k_cols), input_precision=PRECISION) * qk_scale  # [OUT_ROW_BLOCK, COL_BLOCK]
    # Combine the pass-1 partials of each row into its maximum and normaliser.
    offs_s = tl.arange(0, SPLITS_P)
    part = ((b * hq + head) * rows + r[:, None]) * splits + offs_s[None, :]  # [OUT_ROW_BLOCK, SPLITS_P]
    part_ok = row_ok[:, None] & (offs_s[None, :] < splits)
    m_part = tl.load(m_ptr + part, mask=part_ok, other=float("-inf"))
    l_part = tl.load(l_ptr + part, mask=part_ok, other=0.0)
    m = tl.max(m_part, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    norm = tl.sum(l_part * tl.exp2(m_part - m_safe[:, None]), axis=1)
    allowed = col_ok[None, :] & (cols[None, :] <= limit[:, None]) & (norm > 0.0)[:, None]
    return tl.where(allowed, tl.exp2(s - m_safe[:, None]) / tl.where(norm > 0.0, norm, 1.0)[:, None], 0.0)


@triton.jit
def _row_limit(pos_ptr, b, r, row_ok, lk, stride_pb, stride_pr, HAS_POS: tl.constexpr):
    """Last key index each row may attend; -1 (nothing) for rows past the end."""
    if HAS_POS:
        return tl.load(pos_ptr + b * stride_pb + r * stride_pr, mask=row_ok, other=-1).to(tl.int64)
    return tl.where(row_ok, lk - 1, -1).to(tl.int64)


@triton.jit
def _row_weight(w_ptr, b, r, row_ok, rows, stride_wb, stride_wr, HAS_WEIGHTS: tl.constexpr, ROW_MODE: tl.constexpr):
    """Each row's weight in the row reduction (see ``reference.row_weights``); 0 past the end."""
    if HAS_WEIGHTS:
        return tl.load(w_ptr + b * stride_wb + r * stride_wr, mask=row_ok, other=0.0)
    ones = tl.where(row_ok, 1.0, 0.0)
    if ROW_MODE == 0:
        return ones / rows  # every row valid: a plain mean (and 1 for 'sum', whose weights are passed)
    return ones


@triton.jit
def _row_reduce(acc, p, w, ROW_MODE: tl.constexpr):
    """Fold ``[rows, cols]`` block `p` into the ``[cols]`` accumulator: weighted sum or masked max."""
    if ROW_MODE == 0:
        return acc + tl.sum(p * w[:, None], axis=0)
    return tl.maximum(acc, tl.max(tl.where(w[:, None] > 0.0, p, 0.0), axis=0))


@triton.jit
def _probs_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    l_ptr,
    pos_ptr,
    kvv_ptr,
    cols_ptr,
    w_ptr,
    out_ptr,
    rows,
    lk,
    n_cols,
    hq,
    splits,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qr,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_pb,
    stride_pr,
    stride_vb,
    stride_vl,
    stride_cb,
    stride_cs,
    stride_wb,
    stride_wr,
    stride_ob,
    stride_oh,
    stride_or,
    stride_os,
    GROUP: tl.constexpr,
    COL_BLOCK: tl.constexpr,
    OUT_ROW_BLOCK: tl.constexpr,
    SPLITS_P: tl.constexpr,
    DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    HEAD_MODE: tl.constexpr,
    ROW_MODE: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_KV_VALID: tl.constexpr,
    HAS_COLS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (column block, batch): the reduced probabilities of its columns.

    HEAD_MODE: 0 mean, 1 max, 2 none. ROW_MODE: 0 weighted sum (mean and sum), 1 max, 2 none. Heads are
    reduced first, then rows; a row's weight is 1/valid rows (mean), 1 or 0 (the others).
    """
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(0) * COL_BLOCK + tl.arange(0, COL_BLOCK)
    c_in = offs_c < n_cols
    if HAS_COLS:
        cols = tl.load(cols_ptr + b * stride_cb + offs_c * stride_cs, mask=c_in, other=-1).to(tl.int64)
    else:
        cols = tl.where(c_in, offs_c, -1).to(tl.int64)
    col_ok = (cols >= 0) & (cols < lk)  # a column outside [0, Lk) reads 0
    if HAS_KV_VALID:
        col_ok = col_ok & (tl.load(kvv_ptr + b * stride_vb + cols * stride_vl, mask=col_ok, other=0) != 0)
    if HEAD_MODE == 2:
        for head in range(0, hq):
            acc = tl.zeros([COL_BLOCK], tl.float32)
            for row0 in range(0, rows, OUT_ROW_BLOCK):
                r = row0 + tl.arange(0, OUT_ROW_BLOCK)
                row_ok = r < rows
                limit = _row_limit(pos_ptr, b, r, row_ok, lk, stride_pb, stride_pr, HAS_POS)
                w = _row_weight(w_ptr, b, r, row_ok, rows, stride_wb, stride_wr, HAS_WEIGHTS, ROW_MODE)
                p = _probs_block(
                    q_ptr, k_ptr, m_ptr, l_ptr, b, head, r, row_ok, limit, cols, col_ok, rows, hq, splits, qk_scale,
                    stride_qb, stride_qh, stride_qr, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
                    GROUP, SPLITS_P, DIM, DIM_P, UPCAST, PRECISION,
                )  # fmt: skip
                if ROW_MODE == 2:
                    dst = out_ptr + b * stride_ob + head * stride_oh + r[:, None] * stride_or
                    tl.store(dst + offs_c[None, :] * stride_os, p * w[:, None], mask=row_ok[:, None] & c_in[None, :])
                else:
                    acc = _row_reduce(acc, p, w, ROW_MODE)
            if ROW_MODE != 2:
                tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_c * stride_os, acc, mask=c_in)
    else:
        acc = tl.zeros([COL_BLOCK], tl.float32)
        for row0 in range(0, rows, OUT_ROW_BLOCK):
            r = row0 + tl.arange(0, OUT_ROW_BLOCK)
            row_ok = r < rows
            limit = _row_limit(pos_ptr, b, r, row_ok, lk, stride_pb, stride_pr, HAS_POS)
            w = _row_weight(w_ptr, b, r, row_ok, rows, stride_wb, stride_wr, HAS_WEIGHTS, ROW_MODE)
            heads = tl.zeros([OUT_ROW_BLOCK, COL_BLOCK], tl.float32)
            for head in range(0, hq):
                p = _probs_block(
                    q_ptr, k_ptr, m_ptr, l_ptr, b, head, r, row_ok, limit, cols, col_ok, rows, hq, splits, qk_scale,
                    stride_qb, stride_qh, stride_qr, stride_qd, stride_kb, stride_kh, stride_kl, stride_kd,
                    GROUP, SPLITS_P, DIM, DIM_P, UPCAST, PRECISION,
                )  # fmt: skip
                if HEAD_MODE == 0:
                    heads += p
                else:
                    heads = tl.maximum(heads, p)  # probabilities are >= 0, so 0 is the identity
            if HEAD_MODE == 0:
                heads = heads / hq
            if ROW_MODE == 2:
                dst = out_ptr + b * stride_ob + r[:, None] * stride_or + offs_c[None, :] * stride_os
                tl.store(dst, heads * w[:, None], mask=row_ok[:, None] & c_in[None, :])
            else:
                acc = _row_reduce(acc, heads, w, ROW_MODE)
        if ROW_MODE != 2:
            tl.store(out_ptr + b * stride_ob + offs_c * stride_os, acc, mask=c_in)


_HEAD_MODE = {"mean": 0, "max": 1, "none": 2}
_ROW_MODE = {"mean": 0, "sum": 0, "max": 1, "none": 2}


def attn_rows_triton(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    kv_valid: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    head_reduce: str = "mean",
    row_reduce: str = "mean",
    row_valid: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """Triton implementation of ``attn_rows`` (same contract as ``attn_rows_reference``).

    Args:
        config: block sizes and key split; tests force small ones to exercise every loop. None = chosen
            from the shapes.
    """
    check_attn_rows_args(q_rows, k, scale, q_pos, kv_valid, columns, head_reduce, row_reduce, row_valid)
    if q_rows.dtype not in DTYPES or k.dtype != q_rows.dtype:
        raise ValueError(f"attn_rows: the Triton kernel takes q_rows and k of one dtype in {DTYPES}.")
    batch, hq, rows, dim = q_rows.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    if dim > MAX_HEAD_DIM or group > MAX_GROUP:
        raise ValueError(f"attn_rows: the Triton kernel takes head dims <= {MAX_HEAD_DIM}, groups <= {MAX_GROUP}.")
    n_cols = lk if columns is None else columns.shape[1]
    c = choose(config, batch, hkv, group, rows, lk, n_cols, q_rows.dtype, q_rows.device)
    dim_p = max(16, next_pow2(dim))
    keys_per_split = triton.cdiv(triton.cdiv(lk, c.splits), c.key_block) * c.key_block
    splits = triton.cdiv(lk, keys_per_split)  # rounding to key blocks may leave fewer splits
    qk_scale = float(scale) * _LOG2E
    upcast = INTERPRETED
    precision = "ieee" if (q_rows.dtype == torch.float32 or upcast) else "tf32"  # fp16/bf16 ignore it
    dummy = q_rows
    pos = q_pos if q_pos is not None else dummy
    kvv = kv_valid.view(torch.uint8) if kv_valid is not None else dummy
    # [B, Hq, R, splits] partial maxima and sums: O(heads x rows x splits), never O(rows x keys).
    m_part = torch.empty(batch, hq, rows, splits, dtype=torch.float32, device=q_rows.device)
    l_part = torch.empty_like(m_part)
    stats_grid = (batch * hkv, triton.cdiv(rows, c.row_block), splits)
    stats_warps = 8 if next_pow2(group) * c.row_block * c.key_block > 4096 else 4  # the [G x R, keys] logits
    _row_stats_kernel[stats_grid](
        q_rows, k, pos, kvv, m_part, l_part,
        rows, lk, hkv, keys_per_split, splits, qk_scale,
        *q_rows.stride(), *k.stride(),
        pos.stride(0) if q_pos is not None else 0, pos.stride(1) if q_pos is not None else 0,
        kvv.stride(0) if kv_valid is not None else 0, kvv.stride(1) if kv_valid is not None else 0,
        GROUP=group, GROUP_P=next_pow2(group), ROW_BLOCK=c.row_block, KEY_BLOCK=c.key_block,
        DIM=dim, DIM_P=dim_p, HAS_POS=q_pos is not None, HAS_KV_VALID=kv_valid is not None,
        UPCAST=upcast, PRECISION=precision, num_warps=stats_warps,
    )  # fmt: skip

    keep_heads, keep_rows = head_reduce == "none", row_reduce == "none"
    out_shape = (batch, *([hq] if keep_heads else []), *([rows] if keep_rows else []), n_cols)
    out = torch.empty(out_shape, dtype=torch.float32, device=q_rows.device)
    # Output strides of the (batch, head, row, column) axes; a reduced axis has none (0, never used).
    it = iter(out.stride())
    out_strides = (next(it), next(it) if keep_heads else 0, next(it) if keep_rows else 0, next(it))
    has_weights = row_valid is not None or row_reduce == "sum"
    weights = row_weights(row_valid, rows, row_reduce, q_rows) if has_weights else dummy  # [B, R] fp32
    cols = columns if columns is not None else dummy
    # 8 warps for large [rows, columns] blocks, and for fp32, whose FMA dot spills registers with 4 (ptxas).
    probs_warps = 8 if c.out_row_block * c.col_block >= 4096 or q_rows.dtype == torch.float32 else 4
    if n_cols:
        _probs_kernel[(triton.cdiv(n_cols, c.col_block), batch)](
            q_rows, k, m_part, l_part, pos, kvv, cols, weights, out,
            rows, lk, n_cols, hq, splits, qk_scale,
            *q_rows.stride(), *k.stride(),
            pos.stride(0) if q_pos is not None else 0, pos.stride(1) if q_pos is not None else 0,
            kvv.stride(0) if kv_valid is not None else 0, kvv.stride(1) if kv_valid is not None else 0,
            cols.stride(0) if columns is not None else 0, cols.stride(1) if columns is not None else 0,
            weights.stride(0) if has_weights else 0, weights.stride(1) if has_weights else 0,
            *out_strides,
            GROUP=group, COL_BLOCK=c.col_block, OUT_ROW_BLOCK=c.out_row_block, SPLITS_P=max(2, next_pow2(splits)),
            DIM=dim, DIM_P=dim_p, HEAD_MODE=_HEAD_MODE[head_reduce], ROW_MODE=_ROW_MODE[row_reduce],
            HAS_POS=q_pos is not None, HAS_KV_VALID=kv_valid is not None, HAS_COLS=columns is not None,
            HAS_WEIGHTS=has_weights, UPCAST=upcast, PRECISION=precision, num_warps=probs_warps,
        )  # fmt: skip
    return out
