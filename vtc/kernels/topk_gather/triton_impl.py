"""Triton ``topk_gather``: one program per row selects the picks, then one launch gathers every tensor.

Selection needs a whole row (the k-th best value depends on all of it), so it runs one program per
row that reads the row in chunks (see ``vtc.kernels._triton_select``). The gather is pure data movement
and needs the whole GPU's bandwidth, so it is a second launch over (pick, chunk) pairs that copies
every tensor's row at once: the index is read once and the tensors need not share a dtype, because
rows are copied as raw words of their element size.
"""

# ruff: noqa: N803  (Triton's convention: compile-time constexpr parameters are upper case)

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels._triton_select import chunk_for, next_pow2, row_keys, take_chunk, top_threshold
from vtc.kernels.dispatch import interpreting
from vtc.kernels.topk_gather.reference import TopK, check_topk_args

#: Whether these kernels were defined for the interpreter (``TRITON_INTERPRET`` is read at definition).
INTERPRETED = interpreting()
#: Tensors copied per gather launch; more run in further launches.
TENSORS_PER_LAUNCH = 4
#: Raw word type of each element size: the gather copies bits, whatever the dtype.
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _select_kernel(
    scores_ptr,
    valid_ptr,
    k_ptr,
    idx_ptr,
    mask_ptr,
    count_ptr,
    n,
    k_cap,
    k_scalar,
    stride_sb,
    stride_sn,
    stride_vb,
    stride_vn,
    stride_k,
    stride_ib,
    stride_mb,
    CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    K_PER_ROW: tl.constexpr,
):
    """One row: write its picks' positions ascending into slots ``0..k-1``, then clear slots ``k..k_cap-1``."""
    row = tl.program_id(0).to(tl.int64)
    scores_ptr += row * stride_sb
    valid_ptr += row * stride_vb
    k = tl.load(k_ptr + row * stride_k).to(tl.int64) if K_PER_ROW else tl.full([], k_scalar, tl.int64)
    k = tl.minimum(tl.maximum(k, 0), k_cap).to(tl.int32)
    threshold, n_above, k = top_threshold(
        scores_ptr, valid_ptr, stride_sn, stride_vn, n, k, CHUNK, SINGLE, NEGATE=False, HAS_OK=HAS_VALID
    )
    offs = tl.arange(0, CHUNK)
    ties = tl.full([], 0, tl.int32)
    slots = tl.full([], 0, tl.int32)
    for start in range(0, n, CHUNK):
        key, candidate = row_keys(scores_ptr, valid_ptr, stride_sn, stride_vn, n, start + offs, False, HAS_VALID)
        take, chunk_ties = take_chunk(key, candidate, threshold, n_above, k, ties)
        slot = slots + tl.cumsum(take.to(tl.int32), axis=0) - take.to(tl.int32)  # picks before this position
        tl.store(idx_ptr + row * stride_ib + slot, (start + offs).to(tl.int64), mask=take)
        tl.store(mask_ptr + row * stride_mb + slot, tl.full([CHUNK], 1, tl.uint8), mask=take)
        ties += chunk_ties
        slots += tl.sum(take.to(tl.int32), axis=0)
    for start in range(0, k_cap, CHUNK):  # unused slots: index 0, mask False
        empty = (start + offs >= k) & (start + offs < k_cap)
        tl.store(idx_ptr + row * stride_ib + start + offs, tl.zeros([CHUNK], tl.int64), mask=empty)
        tl.store(mask_ptr + row * stride_mb + start + offs, tl.zeros([CHUNK], tl.uint8), mask=empty)
    tl.store(count_ptr + row, k)


@triton.jit
def _copy_row(src_ptr, dst_ptr, width, stride_sb, stride_sn, stride_db, stride_dk, b, n, j, offs):
    """``dst[b, j, offs] = src[b, n, offs]`` for the offsets below `width`."""
    inside = offs < width
    words = tl.load(src_ptr + b * stride_sb + n * stride_sn + offs, mask=inside)
    tl.store(dst_ptr + b * stride_db + j * stride_dk + offs, words, mask=inside)


@triton.jit
def _gather_kernel(
    idx_ptr,
    k_width,
    stride_ib,
    src0,
    dst0,
    w0,
    s0b,
    s0n,
    d0b,
    d0k,
    src1,
    dst1,
    w1,
    s1b,
    s1n,
    d1b,
    d1k,
    src2,
    dst2,
    w2,
    s2b,
    s2n,
    d2b,
    d2k,
    src3,
    dst3,
    w3,
    s3b,
    s3n,
    d3b,
    d3k,
    NUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (pick, chunk): copy chunk `chunk` of the picked row of up to four tensors."""
    pick = tl.program_id(0).to(tl.int64)
    b = pick // k_width
    j = pick % k_width
    n = tl.load(idx_ptr + b * stride_ib + j)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    _copy_row(src0, dst0, w0, s0b, s0n, d0b, d0k, b, n, j, offs)
    if NUM > 1:
        _copy_row(src1, dst1, w1, s1b, s1n, d1b, d1k, b, n, j, offs)
    if NUM > 2:
        _copy_row(src2, dst2, w2, s2b, s2n, d2b, d2k, b, n, j, offs)
    if NUM > 3:
        _copy_row(src3, dst3, w3, s3b, s3n, d3b, d3k, b, n, j, offs)


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, ...]`` -> ``[B, N, W]`` raw words, trailing dims flattened with unit stride (a view if possible)."""
    flat = t.reshape(t.shape[0], t.shape[1], -1)  # [B, N, W]
    if flat.shape[2] > 1 and flat.stride(2) != 1:
        flat = flat.contiguous()
    return flat.view(_WORD[t.element_size()])


def gather_rows(tensors: tuple[torch.Tensor, ...], indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each ``t[b, indices[b]]`` (``[B, K, ...]``), up to four tensors per launch."""
    batch, width = indices.shape
    outs = tuple(torch.empty((batch, width, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in tensors)
    if batch * width == 0:
        return outs
    for first in range(0, len(tensors), TENSORS_PER_LAUNCH):
        group = range(first, min(first + TENSORS_PER_LAUNCH, len(tensors)))
        args: list = []
        widest = 1
        for i in group:
            src = _as_words(tensors[i])
            dst = outs[i].view(batch, width, -1).view(_WORD[outs[i].element_size()])  # [B, K, W] words
            widest = max(widest, src.shape[2])
            args += [src, dst, src.shape[2], src.stride(0), src.stride(1), dst.stride(0), dst.stride(1)]
        args += args[:7] * (TENSORS_PER_LAUNCH - len(group))  # unused slots: never read (NUM is constexpr)
        block = min(next_pow2(widest), 1024)
        grid = (batch * width, triton.cdiv(widest, block))
        _gather_kernel[grid](indices, width, indices.stride(0), *args, NUM=len(group), BLOCK=block, num_warps=4)
    return outs


def topk_gather_triton(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *tensors: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> TopK:
    """Triton implementation of ``topk_gather`` (same contract as ``topk_gather_reference``).

    The output width ``K`` depends on the data when ``k`` is a tensor or ``valid`` is given; then the
    select kernel reports each row's picks and one device-to-host read sizes the result, as in the
    reference. An int ``k`` without ``valid`` needs no synchronisation.
    """
    check_topk_args(scores, k, tensors, valid)
    batch, n = scores.shape
    if scores.dtype not in _SCORE_DTYPES:
        scores = scores.float()  # the reference compares float32 values too
    per_row = isinstance(k, torch.Tensor)
    k_cap = 0 if batch == 0 else n if per_row else min(max(int(k), 0), n)  # K = max over no rows is 0
    device = scores.device
    indices = torch.empty(batch, k_cap, dtype=torch.int64, device=device)
    mask = torch.empty(batch, k_cap, dtype=torch.bool, device=device)
    counts = torch.zeros(batch, dtype=torch.int32, device=device)
    if batch and k_cap:
        chunk, single, warps = chunk_for(n)
        _select_kernel[(batch,)](
            scores,
            valid.view(torch.uint8) if valid is not None else scores,
            k if per_row else counts,
            indices,
            mask.view(torch.uint8),
            counts,
            n,
            k_cap,
            0 if per_row else k_cap,
            scores.stride(0),
            scores.stride(1),
            valid.stride(0) if valid is not None else 0,
            valid.stride(1) if valid is not None else 0,
            k.stride(0) if per_row else 0,
            indices.stride(0),
            mask.stride(0),
            CHUNK=chunk,
            SINGLE=single,
            HAS_VALID=valid is not None,
            K_PER_ROW=per_row,
            num_warps=warps,
        )
    width = k_cap
    if (per_row or valid is not None) and batch and k_cap:
        width = int(counts.max().item())  # the one synchronisation, as in the reference
    if width < k_cap:
        indices, mask = indices[:, :width].contiguous(), mask[:, :width].contiguous()  # [B, K]
    return TopK(indices, mask, gather_rows(tensors, indices))
