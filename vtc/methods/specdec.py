"""Speculative decoding for VLMs: a draft proposes k tokens, the target verifies them in one forward.

``vtc.wrap(model, "specdec", draft=draft_model, k=4)``; stock ``model.generate(...)`` then decodes
speculatively and returns what the target alone returns under greedy decoding (token for token), and
the same distribution under sampling (the speculative-sampling rule, see ``vtc.methods.speculative``).
The draft is a smaller VLM of the family (pruned by its own vtc session if wrapped), a text-only LM
with the target's tokenizer, or a trained draft head that reads the target's own hidden states
(``vtc.methods.draft_head``; the kinds in ``vtc.methods.drafts``). The target may carry pruning methods: their
prefill stages run as they do under stock generate, so ``["dart.r64", "specdec"]`` equals DART alone. It may
carry an output hook that corrects each position on its own (DeCo): the target's forwards run through its
session, the verify forward's logits arrive corrected at every drafted position, and the rules compare
against them, so ``["deco", "specdec"]`` equals DeCo alone.

Each round: the draft drafts ``k`` tokens; the target runs one EXTEND forward over the token it emitted
last plus the drafts; each row keeps its longest agreeing prefix plus the target's next token. Rows of a
batch advance at their own pace (``pacing="row"``): the columns no row keeps are cropped from both caches
(``CacheView.crop``), and a row's other rejected columns become holes, zeros of the 2-D attention mask,
with explicit per-row positions, so each row sees exactly what its batch-1 run sees; once every row
holds a few holes they are packed away (``CacheView.pack_tail``). ``pacing="batch"``
advances every row by the smallest kept prefix (lock-step). Rows stop at their own EOS.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, ClassVar

import torch
from torch import nn

from vtc import surface
from vtc.config import MethodConfig, check_int
from vtc.engine.cache import CacheView
from vtc.errors import MethodConflictError
from vtc.method import HookPoint, Method, register_method
from vtc.methods.drafts import continuing, following, hide_tail, make_draft, pack_holes
from vtc.methods.speculative import accept_greedy, accept_sampling, warp
from vtc.state import SpeculativeStats

MAX_K = 16
#: generate() settings this loop implements; anything else that asks for more is refused by name.
REFUSED = {"num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecDecConfig(MethodConfig):
    """Settings of speculative decoding.

    Attributes:
        draft: the draft model (required): a smaller VLM of the target's family, a causal LM with the
            target's tokenizer, or a ``DraftHead`` built for the target (``vtc.methods.draft_head``).
        k: tokens drafted per round (1..16); with `adaptive`, the first round's.
        adaptive: after a round whose drafts were all kept draft two more next time, otherwise one fewer
            (at least 1, at most 16): transformers' "heuristic" schedule for assisted generation.
        pacing: ``"row"``: each row of a batch keeps its own accepted drafts and advances at its own pace
            (the rejected columns of a row become holes masked out of attention); ``"batch"``: every row
            advances by the smallest number any unfinished row kept (lock-step). Both give every row its
            batch-1 output; "row" needs fewer target forwards when rows accept different lengths.
    """

    draft: nn.Module | None = None
    k: int = 4
    adaptive: bool = False
    pacing: str = "row"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("specdec", "k", self.k, 1, MAX_K)
        if self.pacing not in ("row", "batch"):
            raise ValueError(f"specdec: pacing is 'row' (each row at its own pace) or 'batch'; got {self.pacing!r}.")

    def to_dict(self) -> dict[str, Any]:
        """As every config's, but a draft model is named by its class (a model is not JSON: a config
        read back needs ``draft=`` again)."""
        out = super().to_dict()
        if self.draft is not None:
            out["draft"] = f"<{type(self.draft).__name__}: pass draft= again>"
        return out


@register_method
class SpecDec(Method):
    """The speculative decoding loop, installed as the model's ``generate``."""

    name = "specdec"
    config_cls = SpecDecConfig
    hooks = frozenset({HookPoint.GENERATE})
    prunes = False
    #: The target's forwards run through its session, so an output hook that corrects every position on its
    #: own (DeCo) corrects each verified position: the rules then compare against the corrected target.
    applies_output_hooks = True
    required_settings = ("draft",)
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def bind(self, adapter: Any) -> None:
        super().bind(adapter)
        if not isinstance(self.config.draft, nn.Module):
            raise ValueError(
                f"specdec needs a draft model: vtc.wrap(model, 'specdec', draft=draft_model, k=4); got "
                f"{self.config.draft!r}."
            )
        make_draft(self.config.draft, adapter)  # refuse a draft the target cannot verify now, at wrap

    def generate(self, target: Any, stock: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        extending = [m.name for m in target.methods if m.extends]
        if extending:
            raise MethodConflictError(
                f"specdec verifies drafts in extend forwards, which {', '.join(extending)} would prune; "
                "use it without them, or without specdec."
            )
        settings, inputs = _split(target.model, kwargs)
        with torch.no_grad():
            draft = make_draft(self.config.draft, target)
            c = self.config
            return Loop(target, draft, c.k, settings, adaptive=c.adaptive, pacing=c.pacing).run(inputs)


def _split(model: nn.Module, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(generation settings, model inputs) from generate's keyword arguments."""
    settings = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    inputs = settings.update(**kwargs)  # returns what is not a generation setting
    for name, plain in REFUSED.items():
        if getattr(settings, name, plain) not in (plain, None):
            raise ValueError(f"specdec decodes one sequence per row greedily or by sampling; drop {name}.")
    for name in ("streamer", "logits_processor", "stopping_criteria", "assistant_model", "prefix_allowed_tokens_fn"):
        if inputs.pop(name, None) is not None:
            raise ValueError(f"specdec runs its own loop and does not take {name}; generate without specdec for it.")
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ValueError("specdec needs input_ids and attention_mask (what the processor returns).")
    return settings, inputs


class Loop:
    """One speculative generate call."""

    def __init__(
        self, target: Any, draft: Any, k: int, settings: Any, *, adaptive: bool = False, pacing: str = "row"
    ) -> None:
        self.target, self.draft, self.k, self.settings, self.adaptive = target, draft, k, settings, adaptive
        self.pacing = pacing
        self.model = target.model
        eos = settings.eos_token_id
        self.eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos))
        pad = settings.pad_token_id
        self.pad = pad if pad is not None else (int(self.eos[0]) if len(self.eos) else 0)
        self.sample = bool(settings.do_sample)
        self.stats = SpeculativeStats(k=k)

    def _max_new(self, prompt: int) -> int:
        s = self.settings
        return s.max_new_tokens if s.max_new_tokens is not None else max(0, s.max_length - prompt)

    def distribution(self, logits: torch.Tensor, number: torch.Tensor) -> torch.Tensor:
        """What each row's token `number` ``[B]`` (1 = its first new one) is chosen from, given ``[B, V]``
        logits: the logits with EOS barred before ``min_new_tokens`` (greedy), or the warped probabilities."""
        logits = logits.float()
        if len(self.eos) and self.settings.min_new_tokens:
            barred = torch.as_tensor(number, device=logits.device) <= self.settings.min_new_tokens  # [B] or []
            eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            eos[self.eos] = True
            logits = logits.masked_fill(barred.reshape(-1, 1) & eos, float("-inf"))
        if not self.sample:
            return logits
        s = self.settings
        return warp(logits, s.temperature or 1.0, s.top_k or 0, s.top_p or 1.0).softmax(-1)

    def choose(self, logits: torch.Tensor, number: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's token `number` ``[B]`` and the distribution it was chosen from."""
        d = self.distribution(logits, number)
        return (torch.multinomial(d, 1).squeeze(1) if self.sample else d.argmax(-1)), d

    def target_forward(self, **kwargs: Any) -> Any:
        started = time.perf_counter()
        out = self.model(**kwargs)
        self.stats.target_seconds += time.perf_counter() - started
        return out

    def run(self, inputs: dict[str, Any]) -> torch.Tensor:
        self.draft.open()
        try:
            return self._run(inputs)
        finally:
            self.draft.close()

    def _run(self, inputs: dict[str, Any]) -> torch.Tensor:
        started = time.perf_counter()
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        batch, width = ids.shape
        max_new = self._max_new(width)
        self.eos = self.eos.to(ids.device)
        positions = self.target.prompt_positions(inputs)
        out = self.target_forward(**inputs, position_ids=positions, use_cache=True)
        cache = surface.output_cache(out)
        view = CacheView(cache, surface.num_cache_layers(cache))
        next_pos = following(positions)  # [B] each row's next position
        count = torch.ones(batch, dtype=torch.long, device=ids.device)  # [B] new tokens per row so far
        pending = self.choose(out.logits[:, -1], count)[0][:, None]  # [B, 1] the last token, not yet fed
        rows: list[list[int]] = [[t] for t in pending[:, 0].tolist()]
        done = torch.isin(pending[:, 0], self.eos) | (count >= max_new)
        row_kept = torch.zeros(batch, dtype=torch.long, device=ids.device)
        if not bool(done.all()):
            t0 = time.perf_counter()
            self.draft.start(inputs, pending)
            self.stats.draft_seconds += time.perf_counter() - t0
        while not bool(done.all()):
            room = (max_new - count).masked_fill(done, 1)  # [B] tokens each row may still emit
            k = min(self.k, int(room.max()) - 1)
            t0 = time.perf_counter()
            drafted, q = self.draft.propose(k, lambda logits, i, c=count: self.choose(logits, c + 1 + i))
            self.stats.draft_seconds += time.perf_counter() - t0
            chunk = torch.cat([pending, drafted], dim=1)
            mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
            verify = self.target_forward(
                input_ids=chunk, attention_mask=mask,
                position_ids=continuing(next_pos, k + 1, positions.shape[:-2]), use_cache=True,
                **self.target.text_inputs(chunk), **surface.cache_kwargs(self.model, cache),
            )  # fmt: skip
            kept, tokens = self.verify(drafted, q, verify.logits, count)
            kept = torch.minimum(kept, room - 1)  # a row keeps no more than it may emit
            if self.pacing == "batch":
                kept = torch.full_like(kept, int(kept[~done].min()))
            kept = torch.where(done, kept[~done].max(), kept)  # finished rows leave no holes of their own
            # Row b keeps pending and kept[b] drafts; its other k - kept[b] columns are undone.
            mask, _ = hide_tail(view, mask, k - kept)
            mask = pack_holes(view, mask, width)
            next_pos = next_pos + kept + 1
            pending = tokens.gather(1, kept[:, None])  # [B, 1] each row's token after its kept drafts
            self.draft.commit(kept, drafted, pending, k)
            for b in (~done).nonzero()[:, 0].tolist():
                new = [*drafted[b, : int(kept[b])].tolist(), int(pending[b, 0])]
                ends = [j for j, t in enumerate(new) if t in self.eos.tolist()]
                rows[b] += new[: ends[0] + 1] if ends else new
                row_kept[b] += kept[b]
                done[b] = bool(ends) or len(rows[b]) >= max_new
            count = torch.tensor([len(r) for r in rows], device=ids.device)
            self.stats.rounds += 1
            self.stats.drafted += k
            if self.adaptive and k:
                self.k = min(MAX_K, self.k + 2) if int(kept.min()) == k else max(1, self.k - 1)
                self.stats.k = max(self.stats.k, self.k)
        self.stats.tokens = int(count.max())
        self.stats.row_accepted = row_kept.tolist()
        self.stats.accepted = float(row_kept.float().mean())
        self.stats.total_seconds = time.perf_counter() - started
        self.target.stats.speculative = self.stats
        longest = max(len(r) for r in rows)
        new = torch.full((batch, longest), self.pad, dtype=ids.dtype, device=ids.device)
        for b, row in enumerate(rows):
            new[b, : len(row)] = torch.tensor(row, dtype=ids.dtype)
        return torch.cat([ids, new], dim=1)

    def verify(self, drafted: torch.Tensor, q: torch.Tensor, logits: torch.Tensor, count: torch.Tensor):
        """(kept per row, tokens) by the greedy or the sampling rule, on logits processed like `choose`'s."""
        steps = [self.distribution(logits[:, i], count + 1 + i) for i in range(logits.shape[1])]
        processed = torch.stack(steps, dim=1)
        if not self.sample:
            return accept_greedy(drafted, processed)
        return accept_sampling(drafted, q, processed)
