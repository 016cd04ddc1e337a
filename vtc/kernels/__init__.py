"""vtc's kernels: each op has a torch reference and a Triton implementation.

Importing this package never imports triton; a Triton implementation is loaded only when it may run.
See ``vtc.kernels.dispatch`` for how the backend is chosen and docs/KERNELS.md for the contracts.
"""

from __future__ import annotations

import torch

from vtc.kernels import attn_rows as _attn_rows_pkg  # registers the op's implementations
from vtc.kernels import dispatch
from vtc.kernels import dup_select as _dup_select_pkg  # registers the op's implementations
from vtc.kernels import kv_quant as _kv_quant_pkg  # registers the op's implementations
from vtc.kernels import topk_gather as _topk_gather_pkg  # registers the op's implementations
from vtc.kernels.dispatch import BACKENDS, record, requested, use
from vtc.kernels.kv_quant import QuantizedKV
from vtc.kernels.topk_gather import TopK


def attn_rows(
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
    backend: str | None = None,
) -> torch.Tensor:
    """fp32 softmax probabilities of query rows over all permitted keys, at `columns`, reduced.

    ``q_rows`` ``[B, Hq, R, D]``, ``k`` ``[B, Hkv, Lk, D]`` (not repeated for GQA). Returns ``[B, S]``,
    ``[B, R, S]`` (``row_reduce="none"``), ``[B, Hq, S]`` (``head_reduce="none"``) or ``[B, Hq, R, S]``.
    See ``vtc.kernels.attn_rows.reference.attn_rows_reference`` for the exact contract.
    """
    return dispatch.call(
        "attn_rows",
        q_rows,
        k,
        scale=scale,
        q_pos=q_pos,
        kv_valid=kv_valid,
        columns=columns,
        head_reduce=head_reduce,
        row_reduce=row_reduce,
        row_valid=row_valid,
        backend=backend,
    )


def topk_gather(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *tensors: torch.Tensor,
    valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> TopK:
    """Per-row stable top-k (ties to the lower index), indices ascending, and a gather of `tensors`.

    See ``vtc.kernels.topk_gather.reference.topk_gather_reference`` for the exact contract.
    """
    return dispatch.call("topk_gather", scores, k, *tensors, valid=valid, backend=backend)


def dup_select(
    feats: torch.Tensor,
    pivots: torch.Tensor,
    counts: torch.Tensor,
    pool: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """DART's least-duplicated picks; see ``vtc.kernels.dup_select.reference.dup_select_reference``."""
    return dispatch.call("dup_select", feats, pivots, counts, pool, backend=backend)


def kv_quantize(x: torch.Tensor, bits: int, group_size: int, *, backend: str | None = None) -> QuantizedKV:
    """Quantise `x` ``[..., D]`` per token in groups of `group_size` channels to 2 / 4 / 8-bit codes.

    Asymmetric min-max per group (ZipVL's KV cache format); see
    ``vtc.kernels.kv_quant.reference.kv_quantize_reference`` for the exact contract.
    """
    return dispatch.call("kv_quantize", x, bits, group_size, backend=backend)


def kv_dequantize(q: QuantizedKV, *, backend: str | None = None) -> torch.Tensor:
    """The values `q` stands for, ``q.shape`` in ``q.dtype``; see ``kv_dequantize_reference``."""
    return dispatch.call("kv_dequantize", q, backend=backend)


del _attn_rows_pkg, _dup_select_pkg, _kv_quant_pkg, _topk_gather_pkg

__all__ = [
    "BACKENDS",
    "QuantizedKV",
    "TopK",
    "attn_rows",
    "dup_select",
    "kv_dequantize",
    "kv_quantize",
    "record",
    "requested",
    "topk_gather",
    "use",
]
