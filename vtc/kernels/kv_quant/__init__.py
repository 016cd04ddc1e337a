"""``kv_quantize`` / ``kv_dequantize``: group-wise asymmetric min-max KV quantisation, 2 / 4 / 8 bits."""

from __future__ import annotations

import torch

from vtc.kernels import dispatch
from vtc.kernels.kv_quant.reference import (
    QuantizedKV,
    check_dequantize_args,
    check_quantize_args,
    kv_dequantize_reference,
    kv_quantize_reference,
)

_TRITON = "vtc.kernels.kv_quant.triton_impl"
#: Mirror ``triton_impl``'s limit without importing triton.
MAX_GROUP = 8192


def supports_quantize(x: torch.Tensor, bits: int, group_size: int) -> str | None:
    """None when the Triton kernel can run this call, else why not (imports triton only if it may run)."""
    check_quantize_args(x, bits, group_size)
    if group_size > MAX_GROUP:
        return f"groups above {MAX_GROUP} channels do not fit the kernel's registers (got {group_size})"
    return dispatch.triton_problem(_TRITON, x)


def supports_dequantize(q: QuantizedKV) -> str | None:
    """None when the Triton kernel can run this call, else why not (imports triton only if it may run)."""
    check_dequantize_args(q)
    if q.group_size > MAX_GROUP:
        return f"groups above {MAX_GROUP} channels do not fit the kernel's registers (got {q.group_size})"
    return dispatch.triton_problem(_TRITON, q.data, q.scale, q.zero)


def _dequantize_on_cuda(q: QuantizedKV) -> bool:
    """Auto's rule for Triton, applied to the packed tensor's parts (a ``QuantizedKV`` is no tensor)."""
    return isinstance(q, QuantizedKV) and dispatch.on_cuda(q.data, q.scale, q.zero)


dispatch.register("kv_quantize", "torch", kv_quantize_reference)
dispatch.register(
    "kv_quantize", "triton", dispatch.lazy(_TRITON, "kv_quantize_triton"), supports_quantize, dispatch.on_cuda
)
dispatch.register("kv_dequantize", "torch", kv_dequantize_reference)
dispatch.register(
    "kv_dequantize", "triton", dispatch.lazy(_TRITON, "kv_dequantize_triton"), supports_dequantize, _dequantize_on_cuda
)

__all__ = [
    "QuantizedKV",
    "kv_dequantize_reference",
    "kv_quantize_reference",
    "supports_dequantize",
    "supports_quantize",
]
