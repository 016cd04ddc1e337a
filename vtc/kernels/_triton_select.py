"""Triton building blocks for exact, stable top-k selection over one row, inside one program.

Imported only by Triton implementations (it imports triton). ``topk_gather`` and ``dup_select`` both
need "the k best candidates of a row, ties to the lower index, in index order". A sort would do it,
but a bitonic sort of a long row costs O(N log^2 N) compare-swaps and a register file the row does not
fit in. Instead we find the k-th best *value* by bisection on an integer key (at most 32 counting
passes), then take everything better than it plus the first ties, and place the picks with a prefix
sum. The picks come out in index order for free, and the result is exactly the stable sort's.

A row of up to ``MAX_SINGLE`` elements is loaded once and searched in registers. A longer one is read
in chunks on every pass (from L1 / L2 after the first), so any row length works without spilling
registers: a 64k-token row would need the whole register file of an SM to stay resident.
"""

# ruff: noqa: N803  (Triton's convention: compile-time constexpr parameters are upper case)

from __future__ import annotations

import triton
import triton.language as tl

# Globals a @triton.jit function reads must be constexpr.
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)
#: A row up to MAX_SINGLE elements stays in registers for the whole search; a longer one is read
#: in MAX_CHUNK-element chunks. Both take 4 warps and fit without spills (ptxas, sm_80 / sm_90).
MAX_SINGLE = 2048
MAX_CHUNK = 2048


@triton.jit
def order_key(x):
    """int32 keys whose signed order is the order of fp32 `x` (``-0.0`` and ``+0.0`` get one key).

    A float's bit pattern read as a signed integer is ordered for non-negative floats and reversed for
    negative ones; flipping the 31 low bits of negative patterns fixes the order. NaN is not supported.
    """
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0 must tie, as in a float sort
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def row_keys(val_ptr, ok_ptr, stride_val, stride_ok, n, offs, NEGATE: tl.constexpr, HAS_OK: tl.constexpr):
    """Keys and candidate flags of the row elements at `offs` (past-the-end elements are no candidates).

    Args:
        val_ptr: the row's values (any float dtype; compared as fp32, so fp16 / bf16 are exact).
        ok_ptr: the row's uint8 flags, nonzero where an element may be picked (read if `HAS_OK`).
        NEGATE: rank by ``-value`` (smallest first); negation is exact, so ties stay ties.
    """
    inside = offs < n
    x = tl.load(val_ptr + offs * stride_val, mask=inside, other=0.0).to(tl.float32)
    if NEGATE:
        x = -x
    candidate = inside
    if HAS_OK:
        candidate = candidate & (tl.load(ok_ptr + offs * stride_ok, mask=inside, other=0) != 0)
    return order_key(x), candidate


@triton.jit
def top_threshold(
    val_ptr,
    ok_ptr,
    stride_val,
    stride_ok,
    n,
    k,
    CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,
    NEGATE: tl.constexpr,
    HAS_OK: tl.constexpr,
):
    """Where the `k` best candidates of a row end.

    One pass finds the candidates' count and key range; bisection then finds the largest key ``t`` with
    ``count(key >= t) >= k``, keeping ``count(key >= hi + 1)`` on the way, which is the count strictly
    above the threshold once ``lo == hi``. A row that fits one chunk (``SINGLE``: ``n <= CHUNK``) is
    loaded once and bisected in registers; a longer row is re-read chunk by chunk on every pass.

    Returns:
        ``(threshold, n_above, k)``: the int64 k-th best key, the int32 count of candidates strictly
        above it, and `k` clamped to ``[0, candidates]`` (with k = 0 nothing passes the threshold).
    """
    offs = tl.arange(0, CHUNK)
    lo = tl.full([], INT32_MAX, tl.int64)
    hi = tl.full([], INT32_MIN, tl.int64)
    n_cand = tl.full([], 0, tl.int32)
    for start in range(0, n, CHUNK):
        key, candidate = row_keys(val_ptr, ok_ptr, stride_val, stride_ok, n, start + offs, NEGATE, HAS_OK)
        lo = tl.minimum(lo, tl.min(tl.where(candidate, key, INT32_MAX), axis=0).to(tl.int64))
        hi = tl.maximum(hi, tl.max(tl.where(candidate, key, INT32_MIN), axis=0).to(tl.int64))
        n_cand += tl.sum(candidate.to(tl.int32), axis=0)
    k = tl.minimum(tl.maximum(k, 0), n_cand)
    lo = tl.where(k >= 1, lo, INT32_MAX)  # k = 0: an empty search whose threshold no key passes
    hi = tl.where(k >= 1, hi, INT32_MIN)
    n_above = tl.full([], 0, tl.int32)
    if SINGLE:
        row_key, row_candidate = row_keys(val_ptr, ok_ptr, stride_val, stride_ok, n, offs, NEGATE, HAS_OK)
    while lo < hi:
        mid = (lo + hi + 1) >> 1  # arithmetic shift: a floor, unlike '//' on negative numbers
        if SINGLE:  # the row is in registers: no memory traffic in the loop
            count = tl.sum((row_candidate & (row_key >= mid)).to(tl.int32), axis=0)
        else:
            count = tl.full([], 0, tl.int32)
            for start in range(0, n, CHUNK):
                key, candidate = row_keys(val_ptr, ok_ptr, stride_val, stride_ok, n, start + offs, NEGATE, HAS_OK)
                count += tl.sum((candidate & (key >= mid)).to(tl.int32), axis=0)
        enough = count >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
        n_above = tl.where(enough, n_above, count)
    return lo, n_above, k


@triton.jit
def take_chunk(key, candidate, threshold, n_above, k, ties_before):
    """Which elements of one chunk are among the `k` best: above the threshold, or among its first ties.

    Args:
        ties_before: threshold ties in earlier chunks of the row (ties go to the lower index).

    Returns:
        ``(take, ties)``: the bool block, and the chunk's threshold ties (to carry to the next chunk).
    """
    tie = (candidate & (key == threshold)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie  # ties before this position in the row
    take = candidate & ((key > threshold) | ((tie != 0) & (tie_rank < k - n_above)))
    # tl.where, not '&': the interpreter mistypes a bool block '&' a bool scalar.
    return tl.where(k >= 1, take, False), tl.sum(tie, axis=0)


def chunk_for(n: int) -> tuple[int, bool, int]:
    """``(CHUNK, SINGLE, num_warps)`` for a row of `n` elements.

    One chunk, kept in registers, up to ``MAX_SINGLE`` elements; else ``MAX_CHUNK``-element chunks. At
    most 16 keys per thread either way.
    """
    chunk = triton.next_power_of_2(max(int(n), 1))
    return (chunk, True, 4) if chunk <= MAX_SINGLE else (MAX_CHUNK, False, 4)


def next_pow2(n: int) -> int:
    """Triton block sizes are powers of two."""
    return triton.next_power_of_2(max(int(n), 1))
