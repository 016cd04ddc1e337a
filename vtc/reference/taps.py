"""Attention rows of chosen queries, with gradients, from an sdpa forward: what the attention losses read.

Training's attention losses need a few softmax rows per example (the names, the answering tokens) at a few
layers. The eager implementation materialises every row of every layer (``output_attentions``), which at
576 visual tokens costs more than the rest of the step. :class:`AttentionTaps` is an attention
implementation that runs sdpa and, at the layers asked for, also computes the asked rows from the same
query and key.
"""

from __future__ import annotations

from typing import Any

import torch

from vtc import surface


class AttentionTaps:
    """sdpa attention that also returns the attention rows of requested ``(row, query position)`` pairs.

    Register once (:meth:`install`), then per step: :meth:`ask` which rows each layer should keep, run the
    forward, and read them with :meth:`rows` (``[N, heads, keys]``, in the order asked).
    """

    name = "vtc_reference_taps"

    def __init__(self) -> None:
        self._asked: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._rows: dict[int, torch.Tensor] = {}

    def install(self, text_config: Any) -> None:
        """Register the implementation and switch the language model (only) to it."""
        surface.register_attention(self.name, self, masks_like="sdpa")
        surface.set_attention_implementation(text_config, self.name)

    def ask(self, layer: int, rows: torch.Tensor, at: torch.Tensor) -> tuple[int, int]:
        """Keep the rows of queries ``(rows[i], at[i])`` at `layer`; returns their slice in :meth:`rows`."""
        asked = self._asked.setdefault(layer, [])
        start = sum(len(r) for r, _ in asked)
        asked.append((rows, at))
        return start, start + len(rows)

    def rows(self, layer: int, span: tuple[int, int]) -> torch.Tensor:
        """The rows :meth:`ask` returned `span` for, from the last forward: ``[N, heads, keys]`` fp32."""
        return self._rows[layer][span[0] : span[1]]

    def clear(self) -> None:
        self._asked.clear()
        self._rows.clear()

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        out = surface.attention_function("sdpa", module)(module, query, key, value, attention_mask, **kwargs)
        asked = self._asked.get(module.layer_idx)
        if asked:
            rows = torch.cat([r for r, _ in asked])
            at = torch.cat([a for _, a in asked])
            q = query[rows, :, at].float()  # [N, Hq, D]
            k = key[rows].float()  # [N, Hkv, S, D]
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scaling = kwargs.get("scaling") or module.scaling
            logits = torch.einsum("nhd,nhsd->nhs", q, k) * scaling
            keys = torch.arange(k.shape[2], device=k.device)
            if attention_mask is None:  # sdpa's causal shortcut: no padding in the batch
                allowed = keys[None] <= at[:, None] + (k.shape[2] - query.shape[2])
            elif attention_mask.dtype == torch.bool:
                allowed = attention_mask[rows, 0, at, : k.shape[2]]
            else:
                allowed = attention_mask[rows, 0, at, : k.shape[2]] > torch.finfo(attention_mask.dtype).min / 2
            self._rows[module.layer_idx] = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
        return out
