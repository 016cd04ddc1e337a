"""Torch reference of ``attn_rows``: attention probabilities of a few query rows, reduced.

The reference forms the ``[B, Hq, R, Lk]`` logits of the selected rows only, which is O(R x L) memory:
fine as a definition and on a CPU; the Triton kernel never forms it.
"""

from __future__ import annotations

import torch

from vtc.kernels._checks import check_same_device, check_tensor, fail

OP = "attn_rows"
HEAD_REDUCE = ("mean", "max", "none")
ROW_REDUCE = ("mean", "max", "sum", "none")


def check_attn_rows_args(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    kv_valid: torch.Tensor | None,
    columns: torch.Tensor | None,
    head_reduce: str,
    row_reduce: str,
    row_valid: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` for a call that breaks ``attn_rows``'s contract (shapes, dtypes, devices)."""
    check_tensor(OP, "q_rows", q_rows, (None, None, None, None), "float")
    batch, hq, rows, dim = q_rows.shape
    check_tensor(OP, "k", k, (batch, None, None, dim), "float")
    hkv = k.shape[1]
    if rows == 0 or k.shape[2] == 0:
        fail(OP, f"needs at least one query row and one key; got {rows} rows and {k.shape[2]} keys.")
    if hkv == 0 or hq % hkv:
        fail(OP, f"query heads ({hq}) must be a multiple of key heads ({hkv}) (grouped-query attention).")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        fail(OP, f"scale must be a number; got {type(scale).__name__}.")
    check_tensor(OP, "q_pos", q_pos, (batch, rows), "int", optional=True)
    check_tensor(OP, "kv_valid", kv_valid, (batch, k.shape[2]), "bool", optional=True)
    check_tensor(OP, "columns", columns, (batch, None), "int", optional=True)
    check_tensor(OP, "row_valid", row_valid, (batch, rows), "bool", optional=True)
    if head_reduce not in HEAD_REDUCE:
        fail(OP, f"head_reduce must be one of {', '.join(HEAD_REDUCE)}; got {head_reduce!r}.")
    if row_reduce not in ROW_REDUCE:
        fail(OP, f"row_reduce must be one of {', '.join(ROW_REDUCE)}; got {row_reduce!r}.")
    check_same_device(OP, q_rows=q_rows, k=k, q_pos=q_pos, kv_valid=kv_valid, columns=columns, row_valid=row_valid)


def row_weights(row_valid: torch.Tensor | None, rows: int, row_reduce: str, like: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` fp32 weight of each row in the row reduction.

    ``mean``: 1 / (valid rows) for a valid row (a batch row with no valid row reads 0); the other
    reductions: 1 for a valid row, 0 for an invalid one (``max`` uses it as a mask, ``none`` zeroes
    invalid rows).
    """
    batch = like.shape[0]
    valid = (
        torch.ones(batch, rows, dtype=torch.float32, device=like.device)
        if row_valid is None
        else row_valid.to(torch.float32)
    )
    if row_reduce == "mean":
        valid = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
    return valid


def attn_rows_reference(
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
) -> torch.Tensor:
    """Softmax probabilities of selected query rows over all keys, returned for a key span, reduced.

    The softmax normaliser runs over every key a row may attend (causal limit and ``kv_valid``), not
    just over `columns`, so the values are the model's own attention probabilities. Query head ``h``
    reads key head ``h // (Hq // Hkv)``, as transformers' ``repeat_kv`` does, without repeating K.

    Args:
        q_rows: ``[B, Hq, R, D]`` post-RoPE queries of the selected rows.
        k: ``[B, Hkv, Lk, D]`` post-RoPE keys (cache included), not repeated for GQA.
        scale: softmax scale (usually ``1 / sqrt(D)``).
        q_pos: ``[B, R]`` integers: row ``r`` attends keys with index ``<= q_pos[b, r]``; None = all keys.
            A row whose limit admits no key has probability 0 everywhere.
        kv_valid: ``[B, Lk]`` keys that exist (padding False); excluded from the normaliser too.
        columns: ``[B, S]`` key indices whose probabilities are returned (None = all ``Lk``). A column
            outside a row's causal / valid range, or outside ``[0, Lk)`` (e.g. -1 padding), reads 0.
        head_reduce: ``"mean" | "max" | "none"`` over the ``Hq`` query heads (applied first).
        row_reduce: ``"mean" | "max" | "sum" | "none"`` over the rows (applied second).
        row_valid: ``[B, R]`` rows that take part in the row reduction: ``mean`` averages valid rows only;
            with ``none`` an invalid row reads 0. None = all rows.

    Returns:
        fp32 ``[B, S]`` (both reduced), ``[B, R, S]`` (rows not reduced), ``[B, Hq, S]`` (heads not
        reduced) or ``[B, Hq, R, S]`` (neither).
    """
    check_attn_rows_args(q_rows, k, scale, q_pos, kv_valid, columns, head_reduce, row_reduce, row_valid)
    batch, hq, rows, dim = q_rows.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    q = q_rows.float().reshape(batch, hkv, group, rows, dim)  # [B, Hkv, G, R, D]; head h = kv * G + g
    logits = torch.einsum("bkgrd,bkld->bkgrl", q, k.float()) * scale  # [B, Hkv, G, R, Lk]
    logits = logits.reshape(batch, hq, rows, lk)  # [B, Hq, R, Lk]

    allowed = torch.ones(batch, rows, lk, dtype=torch.bool, device=k.device)  # [B, R, Lk]
    if q_pos is not None:
        allowed &= torch.arange(lk, device=k.device) <= q_pos[:, :, None]
    if kv_valid is not None:
        allowed &= kv_valid[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    # A row with no permitted key is all -inf, whose softmax is NaN; it reads 0 instead.
    probs = torch.where(allowed[:, None], torch.softmax(logits, dim=-1), 0.0)  # [B, Hq, R, Lk]

    if columns is not None:
        inside = (columns >= 0) & (columns < lk)  # [B, S]
        idx = columns.clamp(0, lk - 1)[:, None, None, :].expand(batch, hq, rows, -1)  # [B, Hq, R, S]
        probs = torch.where(inside[:, None, None, :], probs.gather(3, idx), 0.0)

    if head_reduce == "mean":
        probs = probs.mean(dim=1)  # [B, R, S]
    elif head_reduce == "max":
        probs = probs.amax(dim=1)  # [B, R, S]
    row_dim = 1 if head_reduce != "none" else 2
    w = row_weights(row_valid, rows, row_reduce, q_rows)  # [B, R]
    w = w[:, :, None] if head_reduce != "none" else w[:, None, :, None]  # broadcast over the row axis
    if row_reduce in ("mean", "sum"):
        return (probs * w).sum(dim=row_dim)
    if row_reduce == "max":
        return torch.where(w > 0, probs, 0.0).amax(dim=row_dim)
    return probs * w
