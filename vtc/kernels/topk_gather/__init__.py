"""``topk_gather``: stable per-row top-k, sorted indices, and the gather of token-axis tensors."""

from vtc.kernels import dispatch
from vtc.kernels.topk_gather.reference import TopK, topk_gather_reference

dispatch.register("topk_gather", "torch", topk_gather_reference)

__all__ = ["TopK", "topk_gather_reference"]
