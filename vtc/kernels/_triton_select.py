"""Triton building blocks for exact, stable top-k selection inside one program.

Imported only by Triton implementations (it imports triton). ``topk_gather`` and ``dup_select`` both
need "the k best candidates of a row, ties to the lower index, in index order". A sort would do it, but
a bitonic sort of a long row costs O(N log^2 N) compare-swaps and its registers; instead we find the
k-th best *value* by bisection on an integer key (at most 32 cheap count passes over a row held in
registers), then take everything better than it plus the first ties, and place the picks with a prefix
sum. The picks come out in index order for free, and the result is exactly the stable sort's.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals a @triton.jit function reads must be constexpr.
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)


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
def kth_largest(key, candidate, k):
    """The `k`-th largest key among candidates, and how many candidates are strictly larger.

    Bisection on the key value: the largest ``t`` with ``count(candidate & key >= t) >= k``. It keeps
    ``count(key >= hi + 1)`` on the way, which is the strictly-larger count once ``lo == hi``.

    Args:
        key: int32 keys of one row (a block in registers).
        candidate: bool block, the keys that may be picked.
        k: scalar, ``1 <= k <= count(candidate)``; with ``k < 1`` the result picks nothing.

    Returns:
        ``(threshold, n_above)``: int64 threshold key and int32 count of candidates above it.
    """
    lo = tl.min(tl.where(candidate, key, INT32_MAX), axis=0).to(tl.int64)
    hi = tl.max(tl.where(candidate, key, INT32_MIN), axis=0).to(tl.int64)
    lo = tl.where(k >= 1, lo, INT32_MAX)  # k < 1: an empty search whose threshold no key passes
    hi = tl.where(k >= 1, hi, INT32_MIN)
    n_above = tl.sum(tl.zeros_like(key), axis=0)  # int32 0
    while lo < hi:
        mid = (lo + hi + 1) >> 1  # arithmetic shift: a floor, unlike '//' on negative numbers
        count = tl.sum((candidate & (key >= mid)).to(tl.int32), axis=0)
        enough = count >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
        n_above = tl.where(enough, n_above, count)
    return lo, n_above


@triton.jit
def take_top(key, candidate, k):
    """Bool block: the `k` largest candidate keys, ties to the lower index (``k`` already <= candidates)."""
    threshold, n_above = kth_largest(key, candidate, k)
    tie = candidate & (key == threshold)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)  # ties before this position
    take = candidate & ((key > threshold) | (tie & (tie_rank < k - n_above)))
    # tl.where, not '&': the interpreter mistypes a bool block '&' a bool scalar.
    return tl.where(k >= 1, take, False)


def num_warps_for(block: int) -> int:
    """Warps for a program that holds a `block`-element row: enough lanes to keep ~32 keys per thread."""
    return 4 if block <= 4096 else 8 if block <= 8192 else 16


def next_pow2(n: int) -> int:
    """Triton block sizes are powers of two."""
    return triton.next_power_of_2(max(int(n), 1))
