"""``attn_rows``: softmax probabilities of selected query rows over a key span, reduced; O(R x S) memory."""

from __future__ import annotations

from typing import Any

import torch

from vtc.kernels import dispatch
from vtc.kernels.attn_rows.reference import attn_rows_reference, check_attn_rows_args

_TRITON = "vtc.kernels.attn_rows.triton_impl"
#: Mirror ``triton_impl``'s limits without importing triton.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GROUP = 64


def supports_triton(q_rows: torch.Tensor, k: torch.Tensor, **kwargs: Any) -> str | None:
    """None when the Triton kernels can run this call, else why not (imports triton only if they may run)."""
    names = ("scale", "q_pos", "kv_valid", "columns", "head_reduce", "row_reduce", "row_valid")
    defaults = {"q_pos": None, "kv_valid": None, "columns": None, "head_reduce": "mean", "row_reduce": "mean"}
    check_attn_rows_args(q_rows, k, *({**defaults, "row_valid": None, **kwargs}.get(n) for n in names))
    if q_rows.dtype not in DTYPES or k.dtype != q_rows.dtype:
        return f"q_rows and k must share one dtype of {', '.join(map(str, DTYPES))}; got {q_rows.dtype}, {k.dtype}"
    if q_rows.shape[3] > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} do not fit the kernel's registers (got {q_rows.shape[3]})"
    if q_rows.shape[1] // k.shape[1] > MAX_GROUP:
        return f"more than {MAX_GROUP} query heads per key head (got {q_rows.shape[1] // k.shape[1]})"
    return dispatch.triton_problem(_TRITON, q_rows, k, **kwargs)


dispatch.register("attn_rows", "torch", attn_rows_reference)
dispatch.register("attn_rows", "triton", dispatch.lazy(_TRITON, "attn_rows_triton"), supports_triton, dispatch.on_cuda)

__all__ = ["attn_rows_reference", "supports_triton"]
