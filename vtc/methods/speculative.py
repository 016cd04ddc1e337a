"""The verification rules of speculative decoding, as functions of logits (no model in sight).

A draft proposed ``k`` tokens ``d[:, :k]``; one forward of the target over ``[pending, d_1 .. d_k]``
gave ``k + 1`` distributions, the i-th for the token after ``d_i`` (``d_0`` = pending). A rule returns,
per row, how many drafted tokens it keeps and the token that follows them:

- greedy: keep the longest prefix that equals the target's argmax; the next token is the target's
  argmax after it. The output is exactly greedy decoding of the target.
- sampling (Leviathan et al. 2023; Chen et al. 2023): keep ``d_i`` with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection draw from ``max(0, p_i - q_i)`` normalised;
  when all ``k`` are kept draw the bonus token from ``p_k``. Every emitted token is then distributed as
  the target's own sampling would draw it.

Logits are warped (temperature, top-k, top-p) the way ``generate``'s sampling warpers do before either
rule sees them, so ``p`` and ``q`` are the distributions that are actually sampled.
"""

from __future__ import annotations

import torch


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``[..., V]`` logits after temperature, top-k and top-p, as transformers' warpers apply them."""
    out = logits.float()
    if temperature != 1.0:
        out = out / temperature
    if top_k and top_k < out.shape[-1]:
        floor = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < floor, float("-inf"))
    if top_p < 1.0:
        ordered, order = out.sort(dim=-1)  # ascending, as the warper does
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        out = out.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return out


def accept_greedy(drafted: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification.

    Args:
        drafted: ``[B, k]`` draft tokens.
        target_logits: ``[B, k + 1, V]`` the target's logits after pending, d_1, ..., d_k.

    Returns:
        ``(kept [B], tokens [B, k + 1])``: per row the drafted tokens kept, and the target's argmax at
        every position (row b emits ``drafted[b, :kept[b]]`` then ``tokens[b, kept[b]]``).
    """
    best = target_logits.argmax(-1)
    k = drafted.shape[1]
    agree = (drafted == best[:, :k]).long()
    return agree.cumprod(dim=1).sum(dim=1), best


def accept_sampling(
    drafted: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule.

    Args:
        drafted: ``[B, k]`` draft tokens, each drawn from the matching row of `q`.
        q: ``[B, k, V]`` the draft's (warped) probabilities.
        p: ``[B, k + 1, V]`` the target's (warped) probabilities.
        generator: random source (default: torch's global one).

    Returns:
        ``(kept [B], tokens [B, k + 1])``: row b keeps ``drafted[b, :kept[b]]`` and then emits
        ``tokens[b, kept[b]]``, drawn from the residual at a rejection or from ``p_k`` when all were kept.
        Entries of `tokens` before ``kept[b]`` repeat the drafted tokens.
    """
    batch, k = drafted.shape
    rows = torch.arange(batch, device=drafted.device)
    tokens = torch.empty(batch, k + 1, dtype=torch.long, device=drafted.device)
    kept = torch.full((batch,), k, dtype=torch.long, device=drafted.device)
    open_ = torch.ones(batch, dtype=torch.bool, device=drafted.device)
    for i in range(k):
        d = drafted[:, i]
        ratio = p[rows, i, d] / q[rows, i, d].clamp_min(torch.finfo(q.dtype).tiny)
        u = torch.rand(batch, generator=generator, device=drafted.device)
        reject = open_ & (u >= ratio.clamp(max=1.0))
        if bool(reject.any()):
            residual = (p[:, i] - q[:, i]).clamp_min(0)
            total = residual.sum(-1, keepdim=True)
            # p == q makes the residual empty, but then nothing is ever rejected; guard against rounding.
            residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p[:, i])
            fresh = torch.multinomial(residual, 1, generator=generator).squeeze(1)
            tokens[:, i] = torch.where(reject, fresh, d)
            kept = torch.where(reject, torch.full_like(kept, i), kept)
        else:
            tokens[:, i] = d
        open_ &= ~reject
    bonus = torch.multinomial(p[:, k], 1, generator=generator).squeeze(1)
    tokens[:, k] = bonus
    return kept, tokens
