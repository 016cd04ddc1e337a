"""ZipVL (He et al., arXiv 2410.08584): a layer-adaptive share of important tokens, sparse prefill
attention among them, and a KV cache that keeps them well (mixed precision in v1, the rest evicted in v2).

At every decoder layer of the prefill a few probe queries (the last 5% of the tokens plus 5% drawn at
random from the rest, as the authors' ZipCache does) measure how much attention each token receives.
The layer's share of important tokens is the smallest set holding a fraction tau of that attention mass,
so it adapts to each layer and each input; which tokens form it is decided by the attention normalised
by how many queries can see each token. The prefill then attends among the important tokens only: an
important query attends to the important keys it may see, and an unimportant query gets no attention
output (its residual stream passes through), which is where the quadratic saving comes from. After the
prefill, the cache keeps the important tokens at high precision and the others at low precision,
group-wise (``mode="quant"``; the cache really holds the packed codes), or drops the others
(``mode="evict"``, the paper's v2). See docs/METHODS.md for the defaults and where vtc differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch

from vtc import kernels, surface
from vtc.config import MethodConfig, check_fraction, check_int
from vtc.contexts import AttentionCall
from vtc.engine.cache import FULL_BITS, CacheView
from vtc.engine.record import ForwardKind
from vtc.method import HookPoint, Method, register_method

BITS = (2, 4, 8, FULL_BITS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZipVLConfig(MethodConfig):
    """Settings of ZipVL (defaults: the paper's video setting and its authors' ZipCache).

    Attributes:
        tau: attention-mass threshold: each layer keeps the fewest tokens holding this share of the probes'
            attention (paper: 0.96 or 0.975 for images, 0.975 for video). 1 keeps every token.
        probe_recent: share of the tokens, the last ones, used as probe queries (ZipCache: 5%; at least
            the last token).
        probe_random: share of the tokens drawn at random from the others as further probes (ZipCache: 5%).
        sparse_prefill: the prefill attends among the important tokens only (False: dense prefill, the
            cache alone is compressed, as ZipCache does).
        mode: ``"quant"`` (v1: important tokens at `high_bits`, the rest at `low_bits`) or ``"evict"``
            (v2: the rest leave the KV cache).
        high_bits, low_bits: 2, 4, 8 or 16 (16: kept as they are). ZipCache's 4 / 2 by default.
        group_size: channels per quantization group along the head dimension (capped at the head dimension).
        recompress_every: in quant mode, decoded tokens are kept dense and packed at `high_bits` once this
            many have gathered in a layer (the paper's streaming gap of 100); 0 never packs them.
        seed: seed of the random probes (drawn per row from its token count alone, so a row of a batch
            draws what it draws alone).
    """

    tau: float = 0.975
    probe_recent: float = 0.05
    probe_random: float = 0.05
    sparse_prefill: bool = True
    mode: Literal["quant", "evict"] = "quant"
    high_bits: int = 4
    low_bits: int = 2
    group_size: int = 32
    recompress_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("zipvl", "tau", self.tau)
        check_fraction("zipvl", "probe_recent", self.probe_recent, closed_low=True)
        check_fraction("zipvl", "probe_random", self.probe_random, closed_low=True)
        if self.mode not in ("quant", "evict"):
            raise ValueError(f"zipvl: mode must be 'quant' (mixed-precision cache) or 'evict'; got {self.mode!r}.")
        for name in ("high_bits", "low_bits"):
            if getattr(self, name) not in BITS:
                allowed = ", ".join(map(str, BITS))
                raise ValueError(f"zipvl: {name} must be one of {allowed}; got {getattr(self, name)!r}.")
        if self.low_bits > self.high_bits:
            raise ValueError(
                f"zipvl: low_bits ({self.low_bits}) is for the unimportant tokens and cannot exceed high_bits "
                f"({self.high_bits}); swap them."
            )
        check_int("zipvl", "group_size", self.group_size, 1)
        check_int("zipvl", "recompress_every", self.recompress_every, 0)
        check_int("zipvl", "seed", self.seed, 0)


def probe_rows(valid: torch.Tensor, recent: float, random: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe queries of each row: its last ``ceil(recent n)`` tokens (at least one) and ``round(random n)``
    drawn from the others, n being the row's valid tokens.

    The draw depends on n and the seed alone, so a row draws the same probes in a batch as alone.

    Args:
        valid: ``[B, L]`` the slots holding tokens.

    Returns:
        ``rows [B, R]`` slot indices (ascending, padded with 0) and ``row_valid [B, R]``.
    """
    picks = []
    for b in range(valid.shape[0]):
        slots = valid[b].nonzero().flatten()
        n = slots.numel()
        n_recent = min(n, max(1, math.ceil(recent * n)))
        n_random = min(n - n_recent, round(random * n))
        chosen = torch.arange(n - n_recent, n)
        if n_random:
            g = torch.Generator().manual_seed(seed * 1_000_003 + n)
            chosen = torch.cat([torch.randperm(n - n_recent, generator=g)[:n_random], chosen])
        picks.append(slots[chosen.to(slots.device)].sort().values)
    width = max(p.numel() for p in picks)
    rows = torch.zeros(valid.shape[0], width, dtype=torch.long, device=valid.device)
    row_valid = torch.zeros(valid.shape[0], width, dtype=torch.bool, device=valid.device)
    for b, p in enumerate(picks):
        rows[b, : p.numel()], row_valid[b, : p.numel()] = p, True
    return rows, row_valid


def important_tokens(scores: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """ZipVL's important set from the probes' accumulated attention `scores` ``[B, L]`` (Eq. 6-9).

    Its size p is the fewest tokens whose sorted scores reach `tau` of the row's total (all of them at
    tau = 1); its members are the top p by the score divided by the queries that can see each token
    (``n - i`` for the i-th of n tokens), the last token always among them, ties to the earlier token.

    Returns:
        ``[B, L]`` bool, a subset of `valid`.
    """
    n = valid.sum(dim=1)  # [B]
    mass = scores.float().masked_fill(~valid, 0.0)
    if tau >= 1:
        count = n
    else:
        ordered = mass.sort(dim=1, descending=True).values.cumsum(dim=1)  # [B, L]
        count = ((ordered < tau * ordered[:, -1:]).sum(dim=1) + 1).minimum(n)
    rank = valid.long().cumsum(dim=1) - 1  # [B, L] the token's place among the row's tokens
    seen_by = (n[:, None] - rank).clamp(min=1)
    normalised = mass / seen_by
    last = valid & (rank == (n - 1)[:, None])
    normalised = normalised.masked_fill(last, float("inf"))
    picks = kernels.topk_gather(normalised, count, valid=valid)  # indices [B, K] ascending, mask [B, K]
    # Unused pick slots point past the end, so they cannot overwrite a real pick at index 0.
    keep = torch.zeros(valid.shape[0], valid.shape[1] + 1, dtype=torch.bool, device=valid.device)
    keep.scatter_(1, torch.where(picks.mask, picks.indices, valid.shape[1]), True)
    return keep[:, :-1] & valid


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    important: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Prefill attention among the `important` tokens only, on the gathered tokens (no L x L weights).

    An important query attends to the important keys the layer's `mask` lets it see; an unimportant
    query's output is zero.

    Args:
        query: ``[B, Hq, L, D]``; key, value: ``[B, Hkv, L, D]`` (the prefill's tokens, no cache before).
        mask: the layer's mask: None (causal), 2-D ``[B, L]`` padding, or 4-D bool / additive float.
        important: ``[B, L]`` bool.
        scaling: the softmax scale.

    Returns:
        ``[B, L, Hq, D]`` in the query's dtype.
    """
    batch, heads, length, dim = query.shape
    count = important.sum(dim=1)  # [B]
    width = int(count.max())
    order = torch.sort((~important).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # [B, W] ascending
    slot = torch.arange(width, device=query.device)[None, :] < count[:, None]  # [B, W]

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] -> [B, H, W, D]
        return x.gather(2, order[:, None, :, None].expand(batch, x.shape[1], width, x.shape[-1]))

    q, k, v = gather(query), gather(key), gather(value)
    groups = heads // key.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, Hq, W, D]
    if mask is not None and mask.dim() == 4:
        m = mask[..., :length, :length].expand(batch, -1, -1, -1)  # [B, h, L, L]
        m = m.gather(2, order[:, None, :, None].expand(batch, m.shape[1], width, length))
        m = m.gather(3, order[:, None, None, :].expand(batch, m.shape[1], width, width))  # [B, h, W, W]
        keys_ok = slot[:, None, None, :]
        m = m & keys_ok if m.dtype == torch.bool else m.masked_fill(~keys_ok, float("-inf"))
    else:
        m = order[:, :, None] >= order[:, None, :]  # [B, W, W] causal in input order
        if mask is not None:  # 2-D padding mask
            m = m & mask.bool().gather(1, order)[:, None, :]
        m = (m & slot[:, None, :])[:, None]  # [B, 1, W, W]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling)  # [B, Hq, W, D]
    out = torch.where(slot[:, None, :, None], out, 0).transpose(1, 2)  # [B, W, Hq, D]
    full = torch.zeros(batch, length, heads, dim, dtype=query.dtype, device=query.device)
    return full.scatter(1, order[:, :, None, None].expand(batch, width, heads, dim), out.to(query.dtype))


@register_method
class ZipVL(Method):
    """ZipVL: probe attention -> per-layer important tokens -> sparse prefill attention -> mixed-precision
    (or evicted) KV cache."""

    name = "zipvl"
    config_cls = ZipVLConfig
    hooks = frozenset({HookPoint.ATTENTION, HookPoint.CACHE})
    requires = frozenset({"attn_tap"})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "t975": {"tau": 0.975},  # the paper's video setting (and its image default)
        "t96": {"tau": 0.96},  # the paper's other image setting
        "evict": {"tau": 0.975, "mode": "evict"},  # v2: unimportant tokens leave the cache
        "kv": {"tau": 0.975, "sparse_prefill": False},  # the cache alone (ZipCache-like, adaptive ratio)
        "noop": {"tau": 1.0, "high_bits": FULL_BITS, "low_bits": FULL_BITS},
    }
    # The residual stream keeps every token; only attention and the cache change.
    prunes = False

    config: ZipVLConfig

    def __init__(self, config: ZipVLConfig) -> None:
        super().__init__(config)
        self.group = config.group_size
        #: layer -> (important ``[B, L]`` over the call's slots, their input positions) of the last prefill.
        self.important: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: layer -> ``[B]`` tokens each row had at that layer in the last prefill.
        self.tokens: dict[int, torch.Tensor] = {}

    def bind(self, adapter: Any) -> None:
        super().bind(adapter)
        head_dim = adapter.dims().head_dim
        self.group = min(self.config.group_size, head_dim)
        if self.quantizes and (head_dim % self.group or self.group % 4):
            raise ValueError(
                f"zipvl: group_size {self.config.group_size} does not split this model's head dimension "
                f"{head_dim} into groups of a multiple of 4 channels; pass a divisor of {head_dim} (e.g. 32 or 64)."
            )

    @property
    def quantizes(self) -> bool:
        c = self.config
        return c.mode == "quant" and min(c.high_bits, c.low_bits) < FULL_BITS

    @property
    def acts(self) -> bool:
        """Whether anything can change: some token can be unimportant, or the cache is quantized."""
        return self.config.tau < 1 or self.quantizes

    # -- where it acts ------------------------------------------------------------------------------
    def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.config.sparse_prefill and self.config.tau < 1 else ()

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.acts else ()

    # -- prefill -------------------------------------------------------------------------------------
    def on_forward_start(self) -> None:
        self.important, self.tokens = {}, {}

    def select_important(self, call: AttentionCall) -> torch.Tensor:
        """``[B, L]`` this layer's important tokens among the call's slots (computed once per layer and prefill)."""
        entry = self.important.get(call.layer_idx)
        if entry is None or entry[1] is not call.state.index:  # new, or a pre-pass saw other tokens
            c, valid = self.config, call.state.valid
            if c.tau >= 1:
                chosen = valid.clone()
            else:
                rows, row_valid = probe_rows(valid, c.probe_recent, c.probe_random, c.seed)
                scores = call.rows(rows, row_valid=row_valid, head_reduce="mean", row_reduce="sum")  # [B, L]
                chosen = important_tokens(scores, valid, c.tau)
            self.important[call.layer_idx] = (chosen, call.state.index)
            self.tokens[call.layer_idx] = valid.sum(dim=1)
        return self.important[call.layer_idx][0]

    def sparse_attention(self, call: AttentionCall) -> torch.Tensor | None:
        if call.query.shape[2] != call.key.shape[2]:
            return None  # not a prefill over an empty cache
        chosen = self.select_important(call)
        if bool((chosen == call.state.valid).all()):
            return None  # every token is important: the model's own kernel computes the same
        return sparse_attention(call.query, call.key, call.value, call.attention_mask, chosen, call.scaling)

    def on_attention(self, call: AttentionCall) -> None:
        self.select_important(call)

    def ratios(self) -> dict[int, torch.Tensor]:
        """Layer -> ``[B]`` share of each row's tokens that were important in the last prefill."""
        return {j: imp.sum(dim=1) / self.tokens[j].clamp(min=1) for j, (imp, _) in sorted(self.important.items())}

    # -- the KV cache --------------------------------------------------------------------------------
    def on_cache(self, view: CacheView, kind: ForwardKind) -> None:
        if kind is ForwardKind.PREFILL:
            if self.important and (self.quantizes or self.config.mode == "evict"):
                self._compress(view)
        elif self.quantizes and self.config.recompress_every:
            for j in range(view.num_layers):
                dense = view.dense_run(j)
                if view.slots(j) > dense >= self.config.recompress_every:  # a packed layer's decoded tokens
                    view.pack_dense(j, self.config.high_bits, self.group)

    def _important_inputs(self, layer: int, width: int) -> torch.Tensor:
        """``[B, width]`` the prefill's input tokens that were important at `layer`."""
        chosen, index = self.important[layer]
        out = torch.zeros(chosen.shape[0], width + 1, dtype=torch.bool, device=chosen.device)
        out.scatter_(1, torch.where(index >= 0, index, width), chosen & (index >= 0))
        return out[:, :width]

    def _compress(self, view: CacheView) -> None:
        if not surface.is_dynamic_cache(view.cache) or surface.has_sliding_layers(view.cache):
            raise ValueError(
                f"zipvl packs or evicts per layer, which needs the default DynamicCache without sliding-window "
                f"layers; got {type(view.cache).__name__}. Do not pass cache_implementation='static' (or a "
                f"StaticCache), and load Qwen models with use_sliding_window=False (their default)."
            )
        state, start = view.last, view.last_column
        width = state.length
        if self.config.mode == "evict":
            for j in sorted(self.important):
                gone = state.valid & ~self._important_inputs(j, width)
                if bool(gone.any()):
                    drop = torch.zeros(state.batch_size, view.columns, dtype=torch.bool, device=gone.device)
                    drop[:, start : start + width] = gone
                    view.evict(drop, from_layer=j, to_layer=j + 1)
            return
        columns = {j: view.columns_at(j) for j in sorted(self.important)}  # before any layer is packed
        for j, cols in columns.items():
            inputs = (cols - start).clamp(0, width - 1)
            high = self._important_inputs(j, width).gather(1, inputs) & (cols >= start)
            view.pack(j, high, (self.config.high_bits, self.config.low_bits), self.group)
