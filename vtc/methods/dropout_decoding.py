"""Dropout Decoding: uncertainty-guided visual-token dropout (Fang et al., arXiv 2412.06474).

Each visual token, read out through the final norm and the LM head, gives a distribution over the
vocabulary: what the token "says" in text space. Its entropy is the token's aleatoric uncertainty; its
divergence from the mean over all visual tokens is its epistemic uncertainty (the two add up to the
entropy of the mean). At each decoding step an ensemble of contexts, each with visual tokens masked at
random (more often the more epistemically uncertain they are), votes on the next token, like dropout
at test time.

In vtc the prefill's final hidden states give the uncertainties; an output hook then runs each member
as one extra single-token forward on a deep copy of the KV cache with its own attention mask, through
stock ``generate`` (greedy, sampling, beam). Masks are drawn independently per member and per batch row
(the official code nests them by editing one mask in place); a row's draws depend only on the seed,
the step and the row itself, so a row of a batch decodes as it would alone.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Literal

import torch

from vtc import surface
from vtc.config import MethodConfig, check_fraction, check_int
from vtc.method import HookPoint, Method, StepContext, register_method
from vtc.state import VisualTokenState


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropoutDecodingConfig(MethodConfig):
    """Settings of Dropout Decoding (defaults: the official LLaVA-1.5 code).

    Attributes:
        member_probs: the largest drop probability of each ensemble member (K = its length).
        q_min: the drop probability of the least uncertain token; token i drops with
            ``q_min + (m - q_min) * (e_i - min e) / (max e - min e)`` in member m.
        protect_top: a visual token whose top-``protect_top`` read-out ids contain the vanilla next token
            is never dropped (0: no protection, the official ``epis_no_overlap``).
        aggregate: ``"vote"`` (majority of the members' argmax; ties to the earlier member; that member's
            logits and new K/V are used) or ``"avg"`` (the members' mean logits; the vanilla K/V is kept).
        seed: seeds the masks (the official code fixes 24 globally; here only the masks use it).
    """

    member_probs: tuple[float, ...] = (0.3, 0.5, 0.7)
    q_min: float = 0.1
    protect_top: int = 5
    aggregate: Literal["vote", "avg"] = "vote"
    seed: int = 24

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.member_probs:
            raise ValueError("dropout_decoding: member_probs needs at least one member, e.g. (0.3, 0.5, 0.7).")
        for m in self.member_probs:
            check_fraction("dropout_decoding", "member_probs entries", m, closed_low=True)
            if m < self.q_min:
                raise ValueError(f"dropout_decoding: each member probability must be >= q_min={self.q_min}; got {m}.")
        check_fraction("dropout_decoding", "q_min", self.q_min, closed_low=True)
        check_int("dropout_decoding", "protect_top", self.protect_top, 0)
        check_int("dropout_decoding", "seed", self.seed, 0)
        if self.aggregate not in ("vote", "avg"):
            raise ValueError(f"dropout_decoding: aggregate must be 'vote' or 'avg'; got {self.aggregate!r}.")


def uncertainty(logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Aleatoric and epistemic uncertainty of each visual token's read-out distribution.

    Args:
        logits: ``[B, N, V]`` read-out logits of the visual tokens.
        valid: ``[B, N]`` real visual tokens (rows may hold fewer than N).

    Returns:
        ``(aleatoric, epistemic)``, each fp32 ``[B, N]`` (0 at invalid slots): ``H(P_i)`` and
        ``KL(P_i || mean_j P_j)``. Per row, ``mean(aleatoric) + mean(epistemic) = H(mean_j P_j)``.
    """
    logp = logits.float().log_softmax(-1)  # [B, N, V]
    probs = logp.exp()
    w = valid.float()[..., None]
    mean = (probs * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # [B, 1, V]
    aleatoric = -(probs * logp).sum(-1)
    epistemic = (probs * (logp - mean.clamp(min=1e-30).log())).sum(-1)
    return aleatoric * valid, epistemic.clamp(min=0) * valid


@register_method
class DropoutDecoding(Method):
    """Dropout Decoding as a prefill read-out plus an ensemble of masked single-token forwards per step."""

    name = "dropout_decoding"
    config_cls = DropoutDecodingConfig
    hooks = frozenset({HookPoint.GENERATE})
    requires = frozenset({"final_norm"})
    prunes = False
    single_step_reason = (
        "each step it votes over an ensemble of extra single-token forwards on copies of the cache and keeps the "
        "winning member's keys and values; a verify forward scores k + 1 positions at once, so every member would "
        "have to re-run the whole chunk and the cache follow a different winner at each position"
    )
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "noop": {"member_probs": (0.0,), "q_min": 0.0},  # one member, nothing dropped: vanilla
    }

    def on_forward_start(self) -> None:
        self._read: dict[str, torch.Tensor] | None = None
        self._step = 0

    def on_text_output(self, hidden: torch.Tensor, state: VisualTokenState) -> None:
        adapter = self.adapter
        visual = state.visual & state.valid  # [B, L]
        width = int(visual.sum(1).max())
        length = visual.shape[1]
        slots = torch.where(visual, torch.arange(length, device=visual.device), length).sort(1).values[:, :width]
        valid = slots < length  # [B, N]
        slots = slots.clamp(max=length - 1)
        picked = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, N, d], already normed
        logits = adapter.lm_head(picked)  # [B, N, V]
        aleatoric, epistemic = uncertainty(logits, valid)
        k = min(self.config.protect_top, logits.shape[-1])
        self._read = {
            "positions": state.index.gather(1, slots),  # [B, N] input columns of the visual tokens
            "valid": valid,
            "aleatoric": aleatoric,
            "epistemic": epistemic,
            "top": logits.topk(k, dim=-1).indices if k else logits.new_zeros(*valid.shape, 0, dtype=torch.long),
        }
        self._prompt_len = int(state.index.max()) + 1

    def drop_probs(self, member: float) -> torch.Tensor:
        """``[B, N]`` per-token drop probability of one member (0 at invalid slots)."""
        r = self._read
        e, valid = r["epistemic"], r["valid"]
        lo = e.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
        hi = e.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
        scaled = torch.where(hi > lo, (e - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(e))
        q = self.config.q_min + (member - self.config.q_min) * scaled
        return q * valid

    def _draw(self, q: torch.Tensor, member: int) -> torch.Tensor:
        """``[B, N]`` Bernoulli draws from uniforms seeded by (seed, step, member) alone.

        Every row compares the same uniforms (row b's first n) with its own probabilities, so a row draws
        the same mask whatever else shares its batch.
        """
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self._step * 1009 + member)
        return torch.rand(q.shape[1], generator=g).to(q.device)[None, :] < q

    def on_output(self, step: StepContext) -> Any | None:
        if step.prefill or self._read is None:
            return None  # token 1 comes from the vanilla prefill (the official behaviour)
        self._step += 1
        kwargs, out = step.kwargs, step.output
        cache = surface.output_cache(out)
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] != 1:
            raise ValueError("dropout_decoding runs on single-token decode steps, as generate makes them.")
        batch = ids.shape[0]
        if self._read["valid"].shape[0] != batch:
            raise ValueError("dropout_decoding: the decode batch differs from the prefill batch.")
        mask = kwargs.get("attention_mask")
        if mask is None:  # generate drops an all-ones mask
            mask = torch.ones(batch, self._prompt_len + self._step, dtype=torch.long, device=ids.device)
        vanilla = out.logits[:, -1]  # [B, V]
        r = self._read
        protected = (r["top"] == vanilla.argmax(-1)[:, None, None]).any(-1)  # [B, N]
        base = copy.deepcopy(cache)  # the cache before this step: drop the token the vanilla forward added
        surface.crop_cache(base, -1)
        logits, caches = [], []
        for j, m in enumerate(self.config.member_probs):
            drop = self._draw(self.drop_probs(m), j) & r["valid"] & ~protected  # [B, N]
            hide = torch.zeros(mask.shape, dtype=torch.int, device=mask.device)
            hide.scatter_add_(1, r["positions"], drop.int())  # [B, L_total] (padding slots add 0)
            member_mask = mask.masked_fill(hide > 0, 0)
            member_cache = copy.deepcopy(base)
            member = surface.with_cache({**kwargs, "attention_mask": member_mask}, step.adapter.model, member_cache)
            res = step.adapter.run_extra(**member)
            logits.append(res.logits[:, -1])
            caches.append(member_cache)
        stacked = torch.stack(logits, 1)  # [B, K, V]
        if self.config.aggregate == "avg":
            chosen = stacked.float().mean(1).to(vanilla.dtype)
        else:
            winner = vote(stacked.argmax(-1))  # [B]
            chosen = stacked[torch.arange(batch), winner]
            for i in range(surface.num_cache_layers(cache)):  # each row continues from its winner's new K/V
                keys, values = surface.layer_kv(cache, i)
                for b, w in enumerate(winner.tolist()):
                    member_keys, member_values = surface.layer_kv(caches[w], i)
                    keys[b, :, -1] = member_keys[b, :, -1]
                    values[b, :, -1] = member_values[b, :, -1]
        new = out.logits.clone()
        new[:, -1] = chosen
        out.logits = new
        return out


def vote(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` member tokens -> ``[B]`` the index of the first member holding the most common token."""
    counts = (tokens[:, :, None] == tokens[:, None, :]).sum(-1)  # [B, K] votes for each member's token
    return counts.argmax(-1)  # the first maximum: ties go to the earlier member
