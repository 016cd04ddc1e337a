"""VAR: visual attention redistribution (Kang et al., ICLR 2025, arXiv 2503.03321).

Some visual tokens draw much attention without carrying what the text asks about: like the BOS sink of
a language model, they have massive activations in a few fixed hidden dimensions (the sink
dimensions) inherited from the base LLM. VAR finds these sink tokens from the residual stream entering
each layer, finds the image-centric attention rows (much attention on the image, little of it on visual
sinks), and in those rows moves a share of the attention paid to sinks onto the other image tokens, in
proportion to what they already receive. Rows keep summing to one.

In vtc the sink tokens come from a layer reader (prefill), and the redistribution is an attention edit:
only the edited layers compute post-softmax weights (eagerly, for that layer alone, and only when a
visual sink exists there); every other layer keeps the model's sdpa kernel. Sink sets live on the KV
cache object, so decode steps (and deep copies of the cache) use the prompt's sinks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from vtc.config import MethodConfig, check_fraction, check_int
from vtc.method import AttentionCall, HookPoint, LayerContext, Method, register_method

# Sink dimensions the official code hard-codes (read from the base LLM's BOS sink).
SINK_DIMS: dict[str, tuple[int, ...]] = {
    "llava-1.5-7b": (2533, 1415),  # LLaMA-2-7B / Vicuna-7B
    "llava-1.5-13b": (2100, 4743),  # LLaMA-2-13B / Vicuna-13B
}
_ATTR = "_vtc_var_sinks"  # the per-layer sink sets of a prefill, on its KV cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class VARConfig(MethodConfig):
    """Settings of VAR (defaults: the official ``lv1.5_7b.yml``).

    Attributes:
        sink_dims: ``"auto"`` (found from the prompt's first token, the text sink, at the first prefill),
            a known checkpoint name (``"llava-1.5-7b"``, ``"llava-1.5-13b"``) or explicit dimensions.
        num_sink_dims: how many dimensions ``"auto"`` looks for (the papers find two per backbone).
        tau: a token is a sink where its RMS-normalised activation exceeds tau in a sink dimension.
        rho: a row is image-centric only if at most this share of its image attention is on visual sinks.
        summ: ... and at least this much of its attention is on the image.
        p: share of its attention a sink keeps (1 = identity); the rest goes to the other image tokens.
        first_layer: the first edited layer (sinks emerge at layer 2; earlier layers are never edited).
        edit_last_layer: edit the last layer too. The paper's config excludes it; the official code's flag
            is shadowed, so it edits every layer (``"var.official"``).
    """

    sink_dims: str | tuple[int, ...] = "auto"
    num_sink_dims: int = 2
    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    p: float = 0.6
    first_layer: int = 2
    edit_last_layer: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        dims = self.sink_dims
        if isinstance(dims, str):
            if dims != "auto" and dims not in SINK_DIMS:
                known = ", ".join(["auto", *SINK_DIMS])
                raise ValueError(f"var: sink_dims must be one of {known}, or a tuple of dimensions; got {dims!r}.")
        elif not dims or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise ValueError(f"var: sink_dims must be non-negative integers; got {dims!r}.")
        check_int("var", "num_sink_dims", self.num_sink_dims, 1)
        check_int("var", "first_layer", self.first_layer, 0)
        check_fraction("var", "p", self.p, closed_low=True)
        for name in ("tau", "rho", "summ"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"var: {name} must be a number; got {value!r}.")


def rms_activation(hidden: torch.Tensor) -> torch.Tensor:
    """``|h / rms(h)|`` per token, without the norm's learned weight (as the paper measures activations)."""
    h = hidden.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()


def find_sink_dims(sink_hidden: torch.Tensor, num: int = 2, tau: float = 20.0) -> tuple[int, ...]:
    """The paper's procedure: the dimensions in which the text sink token has massive activations.

    Args:
        sink_hidden: ``[..., d]`` hidden states of a known sink token (the prompt's first token), e.g. one
            per layer from 2 on and per prompt; values are averaged over the leading axes.
        num: how many dimensions to return at most.
        tau: a dimension counts only if the mean RMS-normalised activation exceeds this.

    Returns:
        The dimensions, strongest first; empty when the token has no massive activation.
    """
    z = rms_activation(sink_hidden).reshape(-1, sink_hidden.shape[-1]).mean(0)  # [d]
    top = z.topk(min(num, z.numel()))
    return tuple(int(d) for d, v in zip(top.indices, top.values, strict=True) if v > tau)


@register_method
class VAR(Method):
    """VAR as a layer reader (sinks, prefill) and an attention edit in layers first_layer.. (both phases)."""

    name = "var"
    config_cls = VARConfig
    hooks = frozenset({HookPoint.LAYER, HookPoint.ATTENTION})
    requires = frozenset({"attn_tap"})
    prunes = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "official": {"edit_last_layer": True},
        # Not for real use: fixed dimensions and a low tau, so the redistribution runs even on random test
        # models (which have no massive activations, so "auto" finds no sink there and VAR is the identity).
        "demo": {"sink_dims": (0, 1), "tau": 2.0, "rho": 1.0, "summ": 0.0},
        "noop": {"p": 1.0},
    }

    def bind(self, adapter) -> None:
        super().bind(adapter)
        c = self.config
        hidden = adapter.text_config.hidden_size
        self.sink_dims: tuple[int, ...] | None = None  # None until "auto" has looked
        if c.sink_dims != "auto":
            dims = SINK_DIMS[c.sink_dims] if isinstance(c.sink_dims, str) else tuple(c.sink_dims)
            if max(dims) >= hidden:
                raise ValueError(
                    f"var: sink dimensions {dims} do not exist in this model's hidden size {hidden}; use "
                    f"sink_dims='auto' (or the dimensions of this backbone)."
                )
            self.sink_dims = dims
        if c.first_layer >= adapter.num_layers:
            raise ValueError(f"var: first_layer={c.first_layer} but the model has {adapter.num_layers} layers.")
        self._current: dict[int, dict[str, torch.Tensor]] = {}

    def edit_layers(self, num_layers: int) -> tuple[int, ...]:
        end = num_layers if self.config.edit_last_layer else num_layers - 1
        return tuple(range(self.config.first_layer, end))

    def read_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.edit_layers(num_layers)

    def on_forward_start(self) -> None:
        self._current = {}

    # -- sinks (prefill) ---------------------------------------------------------------------------
    def on_layer_input(self, ctx: LayerContext) -> None:
        if not ctx.prefill:
            return
        state = ctx.state
        z = rms_activation(ctx.hidden)  # [B, L, d]
        if self.sink_dims is None:  # "auto": the first prompt's text sink (first valid token) decides
            first = state.valid.long().argmax(dim=1)  # [B]
            token = z.gather(1, first[:, None, None].expand(-1, 1, z.shape[-1]))[:, 0]  # [B, d]
            self.sink_dims = find_sink_dims(token, self.config.num_sink_dims, 0.0)
            self.sink_dims = tuple(d for d in self.sink_dims if bool((token[:, d] > self.config.tau).all()))
        image = state.visual & state.valid  # [B, L]
        if self.sink_dims:
            sink = (z[..., list(self.sink_dims)].amax(-1) > self.config.tau) & state.valid  # [B, L]
        else:
            sink = torch.zeros_like(image)
        slots = torch.arange(image.shape[1], device=image.device)
        image_end = torch.where(image, slots + 1, 0).amax(dim=1)  # [B] first slot after the last visual one
        self._current[ctx.layer_idx] = {"image": image, "sink": sink, "image_end": image_end}
        cache = ctx.adapter.current_cache
        if cache is not None:  # decode steps (and copies of the cache) find the prompt's sinks here
            if ctx.layer_idx == self.edit_layers(ctx.adapter.num_layers)[0]:
                setattr(cache, _ATTR, {})
            getattr(cache, _ATTR)[ctx.layer_idx] = self._current[ctx.layer_idx]

    # -- redistribution (prefill and decode) ---------------------------------------------------------
    def edit_attention(self, call: AttentionCall) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if call.state is not None:
            flags = self._current.get(call.layer_idx)
        else:
            cache = self.adapter.current_cache
            flags = getattr(cache, _ATTR, {}).get(call.layer_idx) if cache is not None else None
        if flags is None or self.config.p == 1.0:
            return None
        image, sink = flags["image"], flags["sink"]
        if not bool((image & sink).any()):
            return None  # no visual sink in this layer: nothing is selected (the paper's early layers)
        lq, lk = call.query.shape[2], call.key.shape[2]
        extra = lk - image.shape[1]  # generated tokens after the prompt: never sinks, never image
        if extra < 0:
            raise ValueError("var: the KV cache holds fewer tokens than the prompt it was built from.")
        pad = torch.zeros(image.shape[0], extra, dtype=torch.bool, device=image.device)
        image, sink = torch.cat([image, pad], 1), torch.cat([sink, pad], 1)  # [B, Lk]
        rows = torch.arange(lk - lq, lk, device=image.device)  # key index of each query row
        if call.state is not None:  # prefill: only the text after the image is redistributed
            rows_ok = rows[None, :] >= flags["image_end"][:, None]  # [B, Lq]
        else:
            rows_ok = torch.ones(image.shape[0], lq, dtype=torch.bool, device=image.device)
        rows_ok &= (image & sink).any(dim=1, keepdim=True)  # a row of the batch without visual sinks: as is
        c = self.config
        return lambda probs: redistribute(probs, image, sink, rows_ok, p=c.p, rho=c.rho, summ=c.summ)


def redistribute(
    probs: torch.Tensor,
    image: torch.Tensor,
    sink: torch.Tensor,
    rows_ok: torch.Tensor,
    *,
    p: float,
    rho: float,
    summ: float,
) -> torch.Tensor:
    """Move ``1 - p`` of the sinks' attention onto non-sink image tokens in image-centric rows.

    Args:
        probs: ``[B, H, Lq, Lk]`` fp32 post-softmax attention.
        image: ``[B, Lk]`` image key columns; sink: ``[B, Lk]`` sink key columns (text or image).
        rows_ok: ``[B, Lq]`` query rows that may be changed.

    Returns:
        ``[B, H, Lq, Lk]``: selected rows keep their sum; every other row is unchanged.
    """
    img, snk = image[:, None, None, :], sink[:, None, None, :]  # [B, 1, 1, Lk]
    on_image = (probs * img).sum(-1)  # [B, H, Lq]
    on_vis_sink = (probs * (img & snk)).sum(-1)
    on_sink = (probs * snk).sum(-1)  # visual and text sinks
    other = img & ~snk
    on_other = (probs * other).sum(-1)
    portion = on_vis_sink / (on_image + 1e-6 * image.sum(-1)[:, None, None])
    selected = (portion <= rho) & (on_image >= summ) & (on_other > 0) & rows_ok[:, None, :]  # [B, H, Lq]
    budget = (1 - p) * on_sink  # [B, H, Lq]
    share = probs * other / on_other.clamp(min=torch.finfo(probs.dtype).tiny)[..., None]  # [B, H, Lq, Lk]
    new = torch.where(snk, probs * p, probs) + budget[..., None] * share
    return torch.where(selected[..., None], new, probs)
