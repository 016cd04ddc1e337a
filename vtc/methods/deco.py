"""DeCo: dynamic correction decoding (Wang et al., ICLR 2025, arXiv 2410.11779).

Hallucinated objects often rank lower in a preceding layer than in the final one: the model "saw" the
right thing earlier and lost it. At every decoding step DeCo restricts the next token to a small
candidate set from the final distribution, picks the preceding layer (in a configured window) that is
most confident about one of those candidates, and adds that layer's logits, scaled by its confidence,
to the final logits.

vtc runs it through stock ``generate``: a reader stashes the hidden states entering the layers after
each candidate layer, and an output hook replaces the logits before generate's logits processors see
them. Greedy, sampling and beam search therefore all decode the mixed logits, for any batch size (each
row on its own). A prefill is corrected at its last position (the one generate decodes); a forward over
new tokens after a cache (a decode step, or the k + 1 tokens speculative decoding verifies in one EXTEND
forward) at every position whose logits it returns (stock generate asks for the last one only, with
``logits_to_keep=1``), each from its own early-layer states, which are what a decode step at that
position computes: so ``["deco", "specdec"]`` decodes exactly what DeCo alone decodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from vtc.config import MethodConfig, check_fraction, check_int
from vtc.method import HookPoint, LayerContext, Method, StepContext, register_method
from vtc.methods.layers import resolve_layer

# Official window: HF hidden_states 20..28 of 32-layer LLaVA-1.5, i.e. outputs of decoder layers 19..27.
PAPER_FIRST, PAPER_LAST, PAPER_DEPTH = 19, 27, 32


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeCoConfig(MethodConfig):
    """Settings of DeCo (defaults: the official evaluation scripts).

    Attributes:
        alpha: weight of the preceding layer's logits (the official scripts use 0.6; the notebook 0.5).
        top_p: candidates are the smallest top set whose probability reaches this (1.0: no nucleus cut).
        top_k: at most this many candidates (0: no cap). With ``top_p=1`` and ``top_k=0`` every token is
            a candidate.
        layers: ``(first, last)`` decoder layers (0-based, inclusive) whose outputs are the candidates for
            the preceding layer; None = the official 19..27 of 32, scaled to this model's depth. The last
            layer is never a candidate (its output is the final logits).
    """

    alpha: float = 0.6
    top_p: float = 0.9
    top_k: int = 20
    layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha >= 0
        if not ok:
            raise ValueError(f"deco: alpha must be a number of at least 0; got {self.alpha!r}.")
        check_fraction("deco", "top_p", self.top_p)
        check_int("deco", "top_k", self.top_k, 0)
        if self.layers is not None and (len(self.layers) != 2 or self.layers[0] > self.layers[1]):
            raise ValueError(f"deco: layers is a (first, last) pair with first <= last; got {self.layers!r}.")

    @property
    def restricts(self) -> bool:
        """The candidate set can exclude tokens (otherwise alpha 0 leaves the logits untouched)."""
        return self.top_p < 1.0 or self.top_k > 0


@register_method
class DeCo(Method):
    """DeCo as a layer reader plus an output hook that mixes early-layer logits into the final ones."""

    name = "deco"
    config_cls = DeCoConfig
    hooks = frozenset({HookPoint.GENERATE, HookPoint.LAYER})
    requires = frozenset({"final_norm"})
    prunes = False
    per_position = True  # each position's correction reads only that position's own states
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "noop": {"alpha": 0.0, "top_p": 1.0, "top_k": 0},
    }

    def bind(self, adapter) -> None:
        super().bind(adapter)
        n = adapter.num_layers
        if n < 2:
            raise ValueError("deco needs a model with at least two decoder layers (a preceding one and the last).")
        c = self.config
        if c.layers is None:
            first = min(round(PAPER_FIRST * n / PAPER_DEPTH), n - 2)
            last = min(round(PAPER_LAST * n / PAPER_DEPTH), n - 2)
        else:
            first, last = (resolve_layer("deco", "layers", x, n) for x in c.layers)
            if last >= n - 1:
                raise ValueError(
                    f"deco: the last layer ({n - 1}) cannot be a preceding layer (its output is the final logits); "
                    f"use layers up to {n - 2}."
                )
        self.candidate_layers = tuple(range(first, last + 1))
        self._last: dict[int, torch.Tensor] = {}

    def read_layers(self, num_layers: int) -> tuple[int, ...]:
        # Layer j's output is layer j+1's input (j is never the last layer).
        return tuple(j + 1 for j in self.candidate_layers)

    def on_forward_start(self) -> None:
        self._last = {}

    def on_layer_input(self, ctx: LayerContext) -> None:
        # A prefill (ctx.state set) is decoded at its last position only; the last slot is the last token
        # even after compaction (vtc pads on the left). Any later forward: every new position.
        self._last[ctx.layer_idx - 1] = ctx.hidden[:, -1:] if ctx.state is not None else ctx.hidden  # [B, n, d]

    def on_output(self, step: StepContext) -> Any | None:
        c = self.config
        if c.alpha == 0 and not c.restricts:
            return None
        out = step.output
        n = min(out.logits.shape[1], self._last[self.candidate_layers[0]].shape[1])  # positions to correct
        batch, vocab = out.logits.shape[0], out.logits.shape[-1]
        final = out.logits[:, -n:].reshape(batch * n, vocab)  # [B * n, V]
        hidden = torch.stack([self._last[j][:, -n:] for j in self.candidate_layers], dim=2)  # [B, n, J, d]
        adapter = step.adapter
        early = adapter.lm_head(adapter.final_norm(hidden)).float()  # [B, n, J, V]
        mixed = mix(final.float(), early.reshape(batch * n, -1, vocab), alpha=c.alpha, top_p=c.top_p, top_k=c.top_k)
        logits = out.logits.clone()
        logits[:, -n:] = mixed.reshape(batch, n, vocab).to(logits.dtype)
        out.logits = logits
        return out


def candidates(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """``[B, V]`` bool: the top tokens until their cumulative probability reaches `top_p`, at most `top_k`.

    As the official code: ``c = min(searchsorted(cumsum, top_p) + 1, top_k)`` over the sorted top-k; the
    argmax is always a candidate.
    """
    vocab = probs.shape[-1]
    k = vocab if top_k == 0 else min(top_k, vocab)
    top = probs.topk(k, dim=-1)  # values sorted descending, [B, k]
    if top_p < 1.0:
        target = torch.full((probs.shape[0], 1), top_p, device=probs.device, dtype=top.values.dtype)
        count = (torch.searchsorted(top.values.cumsum(-1), target) + 1).clamp(max=k)  # [B, 1]
    else:
        count = torch.full((probs.shape[0], 1), k, device=probs.device)
    keep = torch.arange(k, device=probs.device)[None, :] < count  # [B, k]
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, top.indices, keep)


def mix(final: torch.Tensor, early: torch.Tensor, *, alpha: float, top_p: float, top_k: int) -> torch.Tensor:
    """DeCo's corrected logits for one step.

    Args:
        final: ``[B, V]`` fp32 final-layer logits.
        early: ``[B, J, V]`` fp32 logits of the candidate preceding layers (final norm + LM head).

    Returns:
        ``[B, V]`` ``final + alpha * s * early[j*]`` on the candidate set, ``-inf`` elsewhere, where
        ``(j*, s)`` is the layer and probability of the most confident (layer, candidate) pair.
    """
    keep = candidates(final.softmax(-1), top_p, top_k)  # [B, V]
    probs = early.softmax(-1).masked_fill(~keep[:, None, :], 0.0)  # [B, J, V]
    best = probs.amax(dim=-1)  # [B, J] each layer's top candidate probability
    s, j = best.max(dim=-1)  # [B], [B]: the first layer wins ties, as torch.argmax over the flat grid
    anchor = early.gather(1, j[:, None, None].expand(-1, 1, early.shape[-1]))[:, 0]  # [B, V]
    mixed = final + alpha * s[:, None] * anchor
    return mixed.masked_fill(~keep, float("-inf"))
