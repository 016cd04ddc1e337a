"""``dup_select``: DART's cosine-duplication picks against pivots, pivot by pivot."""

from vtc.kernels import dispatch
from vtc.kernels.dup_select.reference import dup_select_reference

dispatch.register("dup_select", "torch", dup_select_reference)

__all__ = ["dup_select_reference"]
