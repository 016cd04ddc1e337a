"""What a method sees at each hook point: an attention call, a layer's input, a model call, a decision.

The engine builds these and hands them to methods; they carry tensors of one forward and nothing that
outlives it. Kept apart from ``vtc.method`` so the method base stays about methods.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from vtc.adapters.base import Adapter
    from vtc.state import VisualTokenState


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What an attention tap sees: one attention call of a text decoder layer.

    Attributes:
        layer_idx: the decoder layer.
        query: ``[B, Hq, Lq, D]`` post-RoPE queries of this forward's tokens.
        key: ``[B, Hkv, Lk, D]`` post-RoPE keys, cache included, not repeated for GQA.
        value: ``[B, Hkv, Lk, D]``.
        attention_mask: the mask the layer's attention received (None, 2-D or 4-D).
        scaling: the softmax scale.
        state: where the visual tokens are among this forward's queries (set by the adapter).
        causal: queries see only earlier keys (decoder layers); False in bidirectional vision towers.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    state: VisualTokenState | None = None
    causal: bool = True

    def rows(
        self,
        rows: torch.Tensor,
        columns: torch.Tensor | None = None,
        *,
        row_valid: torch.Tensor | None = None,
        head_reduce: str = "mean",
        row_reduce: str = "mean",
    ) -> torch.Tensor:
        """Softmax attention probabilities of some query rows, as the layer's own attention computed them.

        Each row's softmax runs over every key it may see (earlier keys in a causal layer; vtc's and the
        user's padding excluded),
        and only the requested `columns` are returned, reduced over heads and rows. Computed from q and k
        by ``vtc.kernels.attn_rows``: never the L x L matrix, and the model keeps its sdpa / flash kernel.

        Args:
            rows: ``[B, R]`` query slots of this forward.
            columns: ``[B, S]`` key slots to return (None: all keys).
            row_valid: ``[B, R]`` rows that count in the row reduction.
            head_reduce: ``"mean"``, ``"max"`` or ``"none"``.
            row_reduce: ``"mean"``, ``"max"``, ``"sum"`` or ``"none"``.

        Returns:
            fp32 ``[B, S]``, ``[B, R, S]``, ``[B, Hq, S]`` or ``[B, Hq, R, S]`` by the reductions.
        """
        from vtc import kernels

        batch, heads, _, dim = self.query.shape
        offset = self.key.shape[2] - self.query.shape[2]  # keys of earlier forwards come first
        if offset and self.state is not None:
            raise ValueError("attention rows are available in a prefill (an empty cache) only.")
        q_rows = self.query.gather(2, rows[:, None, :, None].expand(batch, heads, rows.shape[1], dim))
        kv_valid = self.state.valid if self.state is not None else None
        return kernels.attn_rows(
            q_rows,
            self.key,
            scale=self.scaling,
            q_pos=rows + offset if self.causal else None,
            kv_valid=kv_valid,
            columns=columns,
            head_reduce=head_reduce,
            row_reduce=row_reduce,
            row_valid=row_valid,
        )


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a pruning stage (or a layer reader) sees at the input of a decoder layer.

    Attributes:
        layer_idx: the decoder layer about to run (0 for a stage at the embeddings).
        hidden: ``[B, L, d]`` its input hidden states.
        state: where the visual tokens are in that input; None in a decode step (readers only).
        adapter: the model family's adapter (final norm, dimensions, ...).
    """

    layer_idx: int
    hidden: torch.Tensor
    state: VisualTokenState | None
    adapter: Adapter

    @property
    def prefill(self) -> bool:
        return self.state is not None


@dataclasses.dataclass(frozen=True)
class StepContext:
    """One call of the wrapped model, after it returned, for methods that change what decoding sees.

    Attributes:
        kwargs: the keyword arguments of the call (``generate`` passes everything by keyword), so a
            method can run the model again on edited inputs with ``adapter.run_extra``.
        output: the model's output: ``.logits`` ``[B, L_out, V]`` and the KV cache (``surface.output_cache``).
        prefill: the call started from an empty cache.
        adapter: the model family's adapter.
    """

    kwargs: dict[str, Any]
    output: Any
    prefill: bool
    adapter: Adapter


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a pruning stage decided.

    Attributes:
        keep: ``[B, L]`` bool, true for slots to keep. With ``scope="visual"`` only visual slots are
            read and every other slot is kept.
        hidden: ``[B, L, d]`` replacement hidden states for the current sequence, applied before the
            gather (for example merged tokens written into the slot that represents them), or None.
        scope: ``"visual"`` (the stage prunes visual tokens only) or ``"all"`` (any token may go).
        positions: ``"original"`` keeps each token's input position for its rotary embedding;
            ``"fresh"`` renumbers the kept tokens 0..n-1 as if they were the whole input.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    scope: Literal["visual", "all"] = "visual"
    positions: Literal["original", "fresh"] = "original"


@dataclasses.dataclass(frozen=True)
class VisionContext:
    """What a vision-tower stage sees at the input of a tower layer.

    Attributes:
        layer_idx: the tower layer about to run.
        hidden: ``[N, T, dv]`` tower tokens of N images (CLS first when the tower has one).
        valid: ``[N, T]`` tokens still taking part (earlier stages hide merged tokens).
        grid: patches per side (the patches form a grid x grid raster after the CLS token).
        has_cls: token 0 is a CLS token.
    """

    layer_idx: int
    hidden: torch.Tensor
    valid: torch.Tensor
    grid: int
    has_cls: bool
