"""Triton ``dup_select``: cosine similarities over the whole GPU, then the greedy picks per row.

Two launches rather than one, on purpose. The similarities read every candidate's features
(``N x D``, megabytes), which needs many programs to reach the memory bandwidth; the greedy picks are
sequential in the pivots and need a whole row at a time, which is one program per batch row. One
kernel would either read the features from a single SM per row or need a grid-wide barrier that
Triton does not offer. The ``[B, P, N]`` fp32 similarities between the two are small (P pivots).

The second kernel runs the pivots in order as a chain of exact stable selections
(``vtc.kernels._triton_select``) over the row's remaining pool, which it keeps in a uint8 scratch row.
"""

# ruff: noqa: N803  (Triton's convention: compile-time constexpr parameters are upper case)

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtc.kernels._triton_select import chunk_for, next_pow2, row_keys, take_chunk, top_threshold
from vtc.kernels.dispatch import interpreting
from vtc.kernels.dup_select.reference import check_dup_select_args

#: Whether these kernels were defined for the interpreter (``TRITON_INTERPRET`` is read at definition).
INTERPRETED = interpreting()
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Most pivots per row (the similarity kernel holds all of them in one block).
MAX_PIVOTS = 64


@triton.jit
def _sims_kernel(
    feats_ptr,
    piv_ptr,
    sims_ptr,
    n,
    dim,
    n_piv,
    eps,
    stride_fb,
    stride_fn,
    stride_fd,
    stride_pb,
    stride_pp,
    stride_pd,
    stride_sb,
    stride_sp,
    stride_sn,
    PIV_P: tl.constexpr,
    TOK_BLOCK: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (token block, batch): ``sims[b, p, n] = <piv_p, f_n> / (max(|piv_p|, eps) max(|f_n|, eps))``."""
    b = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * TOK_BLOCK + tl.arange(0, TOK_BLOCK)
    offs_p = tl.arange(0, PIV_P)
    n_ok = offs_n < n
    p_ok = offs_p < n_piv
    dots = tl.zeros([PIV_P, TOK_BLOCK], tl.float32)
    f_sq = tl.zeros([TOK_BLOCK], tl.float32)
    p_sq = tl.zeros([PIV_P], tl.float32)
    for d0 in range(0, dim, DIM_BLOCK):
        offs_d = d0 + tl.arange(0, DIM_BLOCK)
        d_ok = offs_d < dim
        f = tl.load(
            feats_ptr + b * stride_fb + offs_n[:, None] * stride_fn + offs_d[None, :] * stride_fd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [TOK_BLOCK, DIM_BLOCK]
        piv = tl.load(
            piv_ptr + b * stride_pb + offs_p[:, None] * stride_pp + offs_d[None, :] * stride_pd,
            mask=p_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [PIV_P, DIM_BLOCK]
        if UPCAST:  # the interpreter computes bf16 arithmetic wrongly; fp32 holds fp16 / bf16 exactly
            f = f.to(tl.float32)
            piv = piv.to(tl.float32)
        dots = tl.dot(piv, tl.trans(f), dots, input_precision=PRECISION)
        f32 = f.to(tl.float32)
        p32 = piv.to(tl.float32)
        f_sq += tl.sum(f32 * f32, axis=1)
        p_sq += tl.sum(p32 * p32, axis=1)
    # Norms are floored at eps, as the reference does, so a zero vector has similarity 0 to everything.
    denom = tl.maximum(tl.sqrt(p_sq), eps)[:, None] * tl.maximum(tl.sqrt(f_sq), eps)[None, :]
    dst = sims_ptr + b * stride_sb + offs_p[:, None] * stride_sp + offs_n[None, :] * stride_sn
    tl.store(dst, dots / denom, mask=p_ok[:, None] & n_ok[None, :])


@triton.jit
def _pick_kernel(
    sims_ptr,
    counts_ptr,
    pool_ptr,
    avail_ptr,
    out_ptr,
    n,
    n_piv,
    stride_sb,
    stride_sp,
    stride_sn,
    stride_cb,
    stride_cp,
    stride_pb,
    stride_pn,
    stride_ab,
    stride_an,
    stride_ob,
    stride_on,
    CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """One row: for each pivot in order, pick its count of least-similar tokens still available.

    ``avail`` (uint8 scratch, the pool minus the picks so far) and ``out`` (the picks, zeroed by the
    caller) carry the state from pivot to pivot; a barrier after each pivot makes its writes visible to
    every thread before the next one counts.
    """
    b = tl.program_id(0).to(tl.int64)
    avail_ptr += b * stride_ab
    out_ptr += b * stride_ob
    offs = tl.arange(0, CHUNK)
    for start in range(0, n, CHUNK):
        inside = start + offs < n
        in_pool = tl.load(pool_ptr + b * stride_pb + (start + offs) * stride_pn, mask=inside, other=0)
        tl.store(avail_ptr + (start + offs) * stride_an, (in_pool != 0).to(tl.uint8), mask=inside)
    tl.debug_barrier()
    for j in range(0, n_piv):
        sims_row = sims_ptr + b * stride_sb + j * stride_sp
        want = tl.load(counts_ptr + b * stride_cb + j * stride_cp).to(tl.int64)
        want = tl.minimum(tl.maximum(want, 0), n).to(tl.int32)
        # Least similar first = largest -sim; negation is exact, and ties still go to the lower index.
        threshold, n_above, want = top_threshold(
            sims_row, avail_ptr, stride_sn, stride_an, n, want, CHUNK, SINGLE, NEGATE=True, HAS_OK=True
        )
        ties = tl.full([], 0, tl.int32)
        for start in range(0, n, CHUNK):
            key, candidate = row_keys(sims_row, avail_ptr, stride_sn, stride_an, n, start + offs, True, True)
            take, chunk_ties = take_chunk(key, candidate, threshold, n_above, want, ties)
            tl.store(out_ptr + (start + offs) * stride_on, tl.full([CHUNK], 1, tl.uint8), mask=take)
            tl.store(avail_ptr + (start + offs) * stride_an, tl.zeros([CHUNK], tl.uint8), mask=take)
            ties += chunk_ties
        tl.debug_barrier()


def dup_select_triton(
    feats: torch.Tensor,
    pivots: torch.Tensor,
    counts: torch.Tensor,
    pool: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Triton implementation of ``dup_select`` (same contract as ``dup_select_reference``)."""
    check_dup_select_args(feats, pivots, counts, pool)
    batch, n, dim = feats.shape
    n_piv = pivots.shape[1]
    if feats.dtype not in DTYPES or pivots.dtype != feats.dtype:
        raise ValueError(f"dup_select: the Triton kernel takes feats and pivots of one dtype in {DTYPES}.")
    if n_piv > MAX_PIVOTS:
        raise ValueError(f"dup_select: the Triton kernel takes at most {MAX_PIVOTS} pivots.")
    picked = torch.zeros(batch, n, dtype=torch.bool, device=feats.device)
    if batch == 0 or n == 0 or n_piv == 0:
        return picked
    sims = torch.empty(batch, n_piv, n, dtype=torch.float32, device=feats.device)  # [B, P, N]
    upcast = INTERPRETED
    tok_block = 32 if INTERPRETED else 64
    _sims_kernel[(triton.cdiv(n, tok_block), batch)](
        feats, pivots, sims, n, dim, n_piv, float(eps),
        *feats.stride(), *pivots.stride(), *sims.stride(),
        PIV_P=max(16, next_pow2(n_piv)), TOK_BLOCK=tok_block, DIM_BLOCK=min(64, max(16, next_pow2(dim))),
        UPCAST=upcast, PRECISION="ieee" if (feats.dtype == torch.float32 or upcast) else "tf32", num_warps=4,
    )  # fmt: skip
    chunk, single, warps = chunk_for(n)
    pool_bytes = pool.view(torch.uint8)
    avail = torch.empty(batch, n, dtype=torch.uint8, device=feats.device)  # [B, N] scratch: pool minus picks
    out = picked.view(torch.uint8)
    _pick_kernel[(batch,)](
        sims, counts, pool_bytes, avail, out, n, n_piv,
        *sims.stride(), *counts.stride(), *pool_bytes.stride(), *avail.stride(), *out.stride(),
        CHUNK=chunk, SINGLE=single, num_warps=warps,
    )  # fmt: skip
    return picked
