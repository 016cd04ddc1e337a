"""``topk_gather``: stable per-row top-k, sorted indices, and the gather of token-axis tensors."""

from __future__ import annotations

import torch

from vtc.kernels import dispatch
from vtc.kernels.topk_gather.reference import TopK, check_topk_args, topk_gather_reference

_TRITON = "vtc.kernels.topk_gather.triton_impl"


def supports_triton(
    scores: torch.Tensor, k: int | torch.Tensor, *tensors: torch.Tensor, valid: torch.Tensor | None = None
) -> str | None:
    """None when the Triton kernel can run this call, else why not (imports triton only if it may run)."""
    check_topk_args(scores, k, tensors, valid)
    for i, t in enumerate(tensors):
        if t.is_complex() or t.element_size() not in (1, 2, 4, 8):
            return f"tensors[{i}] has dtype {t.dtype}, which the gather cannot copy as words"
    return dispatch.triton_problem(_TRITON, scores, k, *tensors, valid=valid)


dispatch.register("topk_gather", "torch", topk_gather_reference)
dispatch.register(
    "topk_gather", "triton", dispatch.lazy(_TRITON, "topk_gather_triton"), supports_triton, dispatch.on_cuda
)

__all__ = ["TopK", "supports_triton", "topk_gather_reference"]
