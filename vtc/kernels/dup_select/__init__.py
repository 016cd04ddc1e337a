"""``dup_select``: DART's cosine-duplication picks against pivots, pivot by pivot."""

from __future__ import annotations

import torch

from vtc.kernels import dispatch
from vtc.kernels.dup_select.reference import check_dup_select_args, dup_select_reference

_TRITON = "vtc.kernels.dup_select.triton_impl"
#: Mirror ``triton_impl``'s limits without importing triton.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_PIVOTS = 64


def supports_triton(
    feats: torch.Tensor, pivots: torch.Tensor, counts: torch.Tensor, pool: torch.Tensor, eps: float = 1e-6
) -> str | None:
    """None when the Triton kernels can run this call, else why not (imports triton only if they may run)."""
    check_dup_select_args(feats, pivots, counts, pool)
    if feats.dtype not in DTYPES or pivots.dtype != feats.dtype:
        return (
            f"feats and pivots must share one dtype of {', '.join(map(str, DTYPES))}; got {feats.dtype}, {pivots.dtype}"
        )
    if pivots.shape[1] > MAX_PIVOTS:
        return f"more than {MAX_PIVOTS} pivots (got {pivots.shape[1]})"
    return dispatch.triton_problem(_TRITON, feats, pivots, counts, pool)


dispatch.register("dup_select", "torch", dup_select_reference)
dispatch.register(
    "dup_select", "triton", dispatch.lazy(_TRITON, "dup_select_triton"), supports_triton, dispatch.on_cuda
)

__all__ = ["dup_select_reference", "supports_triton"]
