"""vtc's kernels: each op has a torch reference and may have a Triton implementation.

Importing this package never imports triton; a Triton implementation is loaded only when it may run.
See ``vtc.kernels.dispatch`` for how the backend is chosen.
"""

from __future__ import annotations

import torch

from vtc.kernels import dispatch
from vtc.kernels import dup_select as _dup_select_pkg  # registers the op's implementations
from vtc.kernels import topk_gather as _topk_gather_pkg  # registers the op's implementations
from vtc.kernels.dispatch import BACKENDS, record, requested, use
from vtc.kernels.topk_gather import TopK


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


del _dup_select_pkg, _topk_gather_pkg

__all__ = ["BACKENDS", "TopK", "dup_select", "record", "requested", "topk_gather", "use"]
