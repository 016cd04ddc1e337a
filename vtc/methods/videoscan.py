"""VideoScan (arXiv 2503.09387): one carrier token per frame, frames fed as a stream.

Each video frame is fed in its own extend forward, followed by a *carrier*: one extra token whose
embedding is the mean of the frame's visual token embeddings (no parameters). Once the forward is done,
the frame's tokens leave the KV cache and the carrier stays, so every later token sees the frame only
through its carrier's keys and values. A memory bank holds at most ``memory`` carriers: when a new one
overflows it, the earlier carrier of the most similar adjacent pair (cosine of the carrier embeddings)
leaves the bank and the cache. The "+" mode (``keep=k``) also keeps the k frame tokens the carrier
attends to most (its attention row, averaged over heads; each layer ranks by its own row, or all by
``select_layer``'s).

Positions: every token keeps the position the dense prompt gives it (M-RoPE's (t, h, w) or the 1-D
index), and the carrier takes the floor of its frame tokens' mean position (a frame's time, and the
centre of its grid). Nothing is renumbered when tokens leave, so text after the video and decoding
continue exactly where the dense model's would (docs/METHODS.md says why).

It acts through stock ``model.generate`` (the whole prompt is scanned, then decoded greedily or by
sampling) and through ``vtc.stream(handle)``: frames pushed as they arrive, a question asked at any point.
A plain forward of the wrapped model is the dense model: one forward cannot insert the carriers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import torch

from vtc import kernels, surface
from vtc.budget import keep_top_k
from vtc.config import MethodConfig, check_int
from vtc.engine.cache import kv_nbytes
from vtc.engine.record import plan_slots
from vtc.errors import MethodConflictError
from vtc.method import AttentionCall, HookPoint, Method, register_method
from vtc.methods.drafts import continuing
from vtc.methods.speculative import warp
from vtc.state import ScanStats

#: generate() settings the scan's decoding loop implements; anything that asks for more is refused by name.
REFUSED = {"num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False}
#: What a cache slot holds: text, a token of the frame just fed, a carrier, a frame token kept ("+"); -1: padding.
TEXT, FRAME, CARRIER, KEPT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class VideoScanConfig(MethodConfig):
    """Settings of VideoScan.

    Attributes:
        memory: carriers the memory bank holds at most (the paper's 64); 0 keeps every carrier.
        keep: frame tokens kept per frame beside its carrier, ranked by the carrier's attention (the "+"
            mode; 0: the carrier alone; -1 keeps every frame token, for checks against a full pass).
        select_layer: the layer whose carrier attention ranks the kept tokens for every layer; None: each
            layer keeps its own top ``keep`` (the official code's default).
        scan: False leaves the model as it is (the ``noop`` preset).
    """

    memory: int = 64
    keep: int = 0
    select_layer: int | None = None
    scan: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("videoscan", "memory", self.memory, 0)
        check_int("videoscan", "keep", self.keep, -1)
        check_int("videoscan", "select_layer", self.select_layer, -10_000, optional=True)
        if not isinstance(self.scan, bool):
            raise ValueError(f"videoscan: scan must be True or False; got {self.scan!r}.")


@register_method
class VideoScan(Method):
    """The scan, installed as the model's ``generate``, and the carrier tap of the "+" mode."""

    name = "videoscan"
    config_cls = VideoScanConfig
    hooks = frozenset({HookPoint.GENERATE, HookPoint.ATTENTION, HookPoint.CACHE})
    prunes = False  # a plain forward is the dense model; the scan runs in generate and streams
    extends = True  # the "+" tap reads the carrier row in the frames' extend forwards
    media = frozenset({"video"})
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "noop": {"scan": False},
        "m64": {},
        "m16": {"memory": 16},
        "m4": {"memory": 4},
        "plus8": {"keep": 8},
        "plus16": {"keep": 16},
    }

    def __init__(self, config: VideoScanConfig) -> None:
        super().__init__(config)
        #: Set by a scanner while a frame's forward runs: where the carrier and its frame's keys are.
        self.listening: _Listen | None = None

    def bind(self, adapter: Any) -> None:
        super().bind(adapter)
        layer = self.config.select_layer
        if layer is not None and not -adapter.num_layers <= layer < adapter.num_layers:
            raise ValueError(f"videoscan: select_layer {layer} is outside the model's {adapter.num_layers} layers.")

    def check_company(self, others: list[Method]) -> None:
        """Refuse methods that would act on a prompt VideoScan never feeds whole."""
        for other in others:
            if other.prunes or other.hooks - {HookPoint.GENERATE}:
                raise MethodConflictError(
                    f"videoscan feeds a video frame by frame and keeps one carrier per frame; {other.name} prunes "
                    f"or reads a prefill that holds the whole video, which never runs under videoscan. Use "
                    f"videoscan alone (its 'plus8' / 'plus16' presets keep the frame tokens each carrier "
                    f"attends to most), or {other.name} without videoscan."
                )

    def tap_layers(self, num_layers: int) -> tuple[int, ...]:
        if not self.config.scan or self.config.keep <= 0:
            return ()
        layer = self.config.select_layer
        return tuple(range(num_layers)) if layer is None else (layer % num_layers,)

    def on_attention(self, call: AttentionCall) -> None:
        """Record the carrier's attention over its frame's keys (the last query of a frame's forward)."""
        listen = self.listening
        if listen is None:
            return
        keys = call.key.shape[2]
        rows = call.query[:, :, -1:]  # [B, Hq, 1, D]: every row's carrier (chunks are left-padded)
        listen.scores[call.layer_idx] = kernels.attn_rows(
            rows,
            call.key,
            scale=call.scaling,
            q_pos=torch.full((rows.shape[0], 1), keys - 1, device=rows.device),
            kv_valid=listen.valid[:, -keys:],
            columns=listen.columns + (keys - listen.valid.shape[1]),
        )  # [B, F]

    def generate(self, target: Any, stock: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
        if not self.config.scan or not surface.carries_video(kwargs):
            return stock(**kwargs)  # nothing to scan: images and text decode as they are
        settings, inputs = generation_settings(target.model, kwargs)
        with torch.no_grad():
            scanner = Scanner(self, target)
            logits = scanner.feed(inputs)
            new = scanner.decode(logits, settings, max_new(settings, inputs["input_ids"].shape[1]))
        return torch.cat([inputs["input_ids"], new], dim=1)


@dataclasses.dataclass
class _Listen:
    """What the carrier tap needs during one frame's forward.

    Attributes:
        valid: ``[B, S + n]`` the keys each row may attend to (cache slots, then the chunk's tokens).
        columns: ``[B, F]`` key index of each frame token of the chunk (valid indices as padding).
        scores: layer -> ``[B, F]`` the carrier's attention over those keys, mean over heads.
    """

    valid: torch.Tensor
    columns: torch.Tensor
    scores: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


def generation_settings(model: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(generation settings, model inputs) from generate's keyword arguments; refuse what the loop lacks."""
    settings = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    inputs = settings.update(**kwargs)  # returns what is not a generation setting
    for name, plain in REFUSED.items():
        if getattr(settings, name, plain) not in (plain, None):
            raise ValueError(f"videoscan decodes one sequence per row greedily or by sampling; drop {name}.")
    for name in ("streamer", "logits_processor", "stopping_criteria", "assistant_model", "prefix_allowed_tokens_fn"):
        if inputs.pop(name, None) is not None:
            raise ValueError(f"videoscan runs its own loop and does not take {name}; generate without it.")
    if "input_ids" not in inputs:
        raise ValueError("videoscan needs input_ids (what the processor returns).")
    return settings, inputs


def max_new(settings: Any, prompt: int) -> int:
    return settings.max_new_tokens if settings.max_new_tokens is not None else max(0, settings.max_length - prompt)


def frame_keys(visual: torch.Tensor, layout: Any) -> torch.Tensor:
    """``[B, L]`` one key per video frame (its media and frame), -1 for every other token."""
    if layout is None:
        raise ValueError("videoscan needs the model family's visual layout (which frame each token is of).")
    video = visual & (layout.field("modality") == 1)
    return torch.where(video, layout.field("media") * 1_000_000 + layout.field("frame"), -1)


def pieces(keys: torch.Tensor, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One row's tokens as scan steps: ``(text columns, frame columns)`` per frame (the text before the
    frame rides with it), then ``(text after the last frame, None)`` if there is any."""
    out, text, frame = [], [], []
    columns = valid.nonzero().flatten().tolist()
    for i, col in enumerate(columns):
        key = int(keys[col])
        if key < 0:
            text.append(col)
            continue
        frame.append(col)
        if i + 1 == len(columns) or int(keys[columns[i + 1]]) != key:  # the frame's last token
            out.append((torch.tensor(text, dtype=torch.long), torch.tensor(frame, dtype=torch.long)))
            text, frame = [], []
    if text:
        out.append((torch.tensor(text, dtype=torch.long), None))
    return out


class Scanner:
    """One scan: the KV cache of carriers (and text), the bank, and what each cache slot holds.

    Args:
        method: the bound VideoScan method (its config and carrier tap).
        target: the session's bound adapter (``model``, ``embed``, ``run_extra``, positions).
    """

    def __init__(self, method: VideoScan, target: Any) -> None:
        self.method, self.config, self.target = method, method.config, target
        self.cache: Any = None
        self.valid: torch.Tensor | None = None  # [B, S] slots that hold a token
        self.kind: torch.Tensor | None = None  # [B, S] TEXT / FRAME / CARRIER, -1 for padding
        self.frame: torch.Tensor | None = None  # [B, S] the frame number of a carrier or kept frame token
        self.next_pos: torch.Tensor | None = None  # [B] the position after the last token fed
        self.lead: tuple[int, ...] = ()  # leading dims of positions: () or (3,) for M-RoPE
        self.bank: list[list[tuple[int, torch.Tensor]]] = []  # per row (frame number, carrier embedding)
        self.stats = ScanStats()

    # -- feeding ---------------------------------------------------------------------------------------
    def feed(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Feed a prompt or a piece of one (text, images, videos); ``[B, V]`` logits after each row's last token."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        embeds, visual, layout, positions = self.target.embed(**inputs)
        if positions is None:
            positions = self.target.prompt_positions({**inputs, "attention_mask": mask.long()})
        positions = surface.position_rows(positions)
        if self.next_pos is None:
            self._start(ids.shape[0], positions)
        else:  # a later piece: its positions follow what the stream holds
            positions = positions + self.next_pos[:, None]
        keys = frame_keys(visual, layout) if bool(visual.any()) else torch.full_like(ids, -1)
        rows = [pieces(keys[b], mask[b]) for b in range(ids.shape[0])]
        frames = max((sum(f is not None for _, f in r) for r in rows), default=0)
        tail = any(r and r[-1][1] is None for r in rows)
        steps = [[None] * len(rows) for _ in range(frames + tail)]
        for b, row in enumerate(rows):
            for i, piece in enumerate(row):
                steps[-1 if piece[1] is None else i][b] = piece
        logits = torch.zeros(ids.shape[0], 0)
        for step in steps:
            out = self._step(step, embeds, positions)
            fed = torch.tensor([p is not None for p in step], device=embeds.device)
            logits = out if logits.shape[1] == 0 else torch.where(fed[:, None], out, logits)
        last = torch.where(mask, positions.reshape(-1, *mask.shape).amax(0), -1).amax(-1)  # [B]
        self.next_pos = torch.maximum(self.next_pos, last + 1)  # a new tensor: snapshots hold the old one
        self._finish_stats()
        return logits

    def _start(self, batch: int, positions: torch.Tensor) -> None:
        device = positions.device
        self.lead = tuple(positions.shape[:-2])
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.kind = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.frame = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.bank = [[] for _ in range(batch)]
        self.stats = ScanStats(frames=[0] * batch, carriers=[0] * batch, evicted=[0] * batch)

    def _step(self, step: list, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One forward: each row's text and frame (plus its carrier), left-padded; then the cache is cut."""
        batch, device = embeds.shape[0], embeds.device
        parts = []
        for b, piece in enumerate(step):
            if piece is None:
                parts.append(None)
                continue
            text, frame = (t.to(device) if t is not None else None for t in piece)
            columns = text if frame is None else torch.cat([text, frame])
            e, p = embeds[b, columns], positions[..., b, columns]
            kind = torch.full((len(columns),), TEXT, dtype=torch.long, device=device)
            number = torch.full_like(kind, -1)
            if frame is not None:
                self.stats.frames[b] += 1
                carrier, centre = carrier_of(embeds[b], positions[..., b, :], frame)
                e, p = torch.cat([e, carrier[None]]), torch.cat([p, centre[..., None]], dim=-1)
                kind = torch.cat([kind, kind.new_tensor([CARRIER])])
                kind[len(text) : len(columns)] = FRAME
                number = torch.full_like(kind, self.stats.frames[b] - 1)
                number[: len(text)] = -1
                self.bank[b].append((self.stats.frames[b] - 1, carrier.float()))
            parts.append((e, p, kind, number))
        width = max(len(x[2]) for x in parts if x is not None)
        chunk = embeds.new_zeros(batch, width, embeds.shape[-1])
        pos = torch.zeros(*self.lead, batch, width, dtype=torch.long, device=device)
        kind = torch.full((batch, width), -1, dtype=torch.long, device=device)
        number = torch.full_like(kind, -1)
        for b, x in enumerate(parts):
            if x is not None:
                n = len(x[2])
                chunk[b, width - n :], pos[..., b, width - n :], kind[b, width - n :], number[b, width - n :] = x
        valid = torch.cat([self.valid, kind >= 0], dim=1)
        framed = (kind == FRAME).any(dim=1)
        listen = self._listen(valid, kind) if self.config.keep > 0 and bool(framed.any()) else None
        out = self._forward(chunk, valid, pos, listen)
        self.valid, self.kind, self.frame = valid, torch.cat([self.kind, kind], 1), torch.cat([self.frame, number], 1)
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache_bytes())
        if bool(framed.any()):
            self._cut(listen)
        return out.logits[:, -1]

    def _listen(self, valid: torch.Tensor, kind: torch.Tensor) -> _Listen:
        frame = kind == FRAME  # [B, n]
        count = int(frame.sum(dim=1).max())
        _, order = torch.sort(frame.long(), dim=1, descending=True, stable=True)
        columns = order[:, :count] + self.valid.shape[1]  # [B, F] key index of each row's frame tokens
        return _Listen(valid, columns)

    def _forward(self, chunk: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, listen: _Listen | None) -> Any:
        """Run the model on the chunk: the first forward as the model's own prefill, later ones as extras."""
        model = self.target.model
        kwargs = {"inputs_embeds": chunk, "attention_mask": valid.long(), "position_ids": pos, "use_cache": True}
        kwargs["logits_to_keep"] = 1  # only the chunk's last column is read (chunks are left-padded)
        self.method.listening = listen
        try:
            if self.cache is None:
                out = model(**kwargs)
            else:
                out = self.target.run_extra(**kwargs, **surface.cache_kwargs(model, self.cache))
        finally:
            self.method.listening = None
        self.cache = surface.output_cache(out)
        self.stats.forwards += 1
        return out

    # -- the cache ---------------------------------------------------------------------------------------
    def _cut(self, listen: _Listen | None) -> None:
        """Drop the frame tokens just fed (but the top ``keep``), then the carriers the bank lets go."""
        num_layers = surface.num_cache_layers(self.cache)
        fresh = self.kind == FRAME
        drop_frames = self._evict()
        gone = torch.zeros_like(self.valid)
        for b, numbers in enumerate(drop_frames):
            for n in numbers:
                gone[b] |= self.frame[b] == n
        base = self.valid & ~gone & ~fresh  # what every layer keeps
        keeps = [base | self._top(listen, fresh, j, num_layers) for j in range(num_layers)]
        slots, filled = plan_slots(keeps[0])
        for j in range(num_layers):
            layer_slots, _ = plan_slots(keeps[j]) if j else (slots, filled)
            keys, values = surface.layer_kv(self.cache, j)
            idx = layer_slots[:, None, :, None].clamp(min=0).expand(-1, keys.shape[1], -1, keys.shape[-1])
            surface.set_layer_kv(self.cache, j, keys.gather(2, idx), values.gather(2, idx))
        pick = lambda t: torch.where(filled, t.gather(1, slots.clamp(min=0)), -1)  # noqa: E731
        kind = pick(self.kind)
        self.kind, self.frame, self.valid = torch.where(kind == FRAME, KEPT, kind), pick(self.frame), filled

    def _top(self, listen: _Listen | None, fresh: torch.Tensor, layer: int, num_layers: int) -> torch.Tensor:
        """``[B, S]`` this frame's tokens that `layer` keeps: the top ``keep`` by the carrier's attention."""
        keep = self.config.keep
        if keep == 0 or not bool(fresh.any()):
            return torch.zeros_like(fresh)
        if keep < 0:
            return fresh
        at = layer if self.config.select_layer is None else self.config.select_layer % num_layers
        scores = torch.zeros(fresh.shape, dtype=torch.float32, device=fresh.device)
        scores.scatter_(1, listen.columns, listen.scores[at])  # the carrier's attention at its frame's keys
        count = torch.full((fresh.shape[0],), keep, dtype=torch.long, device=fresh.device)
        return keep_top_k(scores, torch.minimum(count, fresh.sum(dim=1)), fresh)

    def _evict(self) -> list[list[int]]:
        """Per row, the frames whose carriers leave a full bank: the earlier of the most similar adjacent pair."""
        out = []
        for b, bank in enumerate(self.bank):
            dropped = []
            while self.config.memory and len(bank) > self.config.memory:
                i = most_similar_pair(torch.stack([c for _, c in bank]))
                dropped.append(bank.pop(i)[0])
                self.stats.evicted[b] += 1
            out.append(dropped)
        return out

    def cache_bytes(self) -> int:
        return kv_nbytes(self.cache)

    def _finish_stats(self) -> None:
        s = self.stats
        s.carriers = (self.kind == CARRIER).sum(dim=1).tolist()
        s.kept_tokens = (self.kind == KEPT).sum(dim=1).tolist()
        s.cache_slots = self.valid.shape[1]
        s.cache_bytes = self.cache_bytes() if self.cache is not None else 0
        self.target.stats.scan = dataclasses.replace(s, frames=list(s.frames), evicted=list(s.evicted))

    # -- decoding ----------------------------------------------------------------------------------------
    def decode(self, logits: torch.Tensor, settings: Any, max_new: int) -> torch.Tensor:
        """``[B, n]`` new tokens after `logits` (the last fed token's): greedy or sampled, EOS-aware."""
        eos = settings.eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
        eos = eos.to(logits.device)
        pad = settings.pad_token_id if settings.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        batch = logits.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        tokens = []
        for number in range(1, max_new + 1):
            if number > 1:
                logits = self._decode_step(tokens[-1])
            token = choose(logits, settings, eos, number)
            token = torch.where(done, pad, token)
            tokens.append(token[:, None])
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
        return torch.cat(tokens, dim=1) if tokens else torch.zeros(batch, 0, dtype=torch.long)

    def _decode_step(self, token: torch.Tensor) -> torch.Tensor:
        model = self.target.model
        self.valid = torch.cat([self.valid, torch.ones_like(token, dtype=torch.bool)], dim=1)
        self.kind = torch.cat([self.kind, torch.full_like(token, TEXT)], dim=1)
        self.frame = torch.cat([self.frame, torch.full_like(token, -1)], dim=1)
        out = model(
            input_ids=token, attention_mask=self.valid.long(), use_cache=True,
            position_ids=continuing(self.next_pos, 1, torch.Size(self.lead)),
            **self.target.text_inputs(token), **surface.cache_kwargs(model, self.cache),
        )  # fmt: skip
        self.next_pos = self.next_pos + 1
        self.cache = surface.output_cache(out)
        return out.logits[:, -1]

    # -- rolling back (a stream's question and answer) -----------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """What ``restore`` needs to forget everything fed after now (layer tensors are replaced, not edited)."""
        layers = [surface.layer_kv(self.cache, j) for j in range(surface.num_cache_layers(self.cache))]
        fields = ("valid", "kind", "frame", "next_pos")
        saved = {f: getattr(self, f) for f in fields}
        return {"layers": layers, "bank": [list(r) for r in self.bank], "stats": copy.deepcopy(self.stats), **saved}

    def restore(self, saved: dict[str, Any]) -> None:
        for j, (keys, values) in enumerate(saved.pop("layers")):
            surface.set_layer_kv(self.cache, j, keys, values)
        for name, value in saved.items():
            setattr(self, name, value)
        self._finish_stats()


def carrier_of(embeds: torch.Tensor, positions: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's carrier: the mean of its tokens' embeddings (``[L, d]`` at columns `frame`, in fp32, then
    the model's dtype) and the floor of their mean position (``[..., L]`` positions, each M-RoPE row alike)."""
    carrier = embeds[frame].float().mean(0).to(embeds.dtype)
    return carrier, positions[..., frame].sum(-1) // len(frame)


def most_similar_pair(carriers: torch.Tensor) -> int:
    """The index of the earlier carrier of the adjacent pair with the highest cosine similarity (ties: first)."""
    sims = torch.nn.functional.cosine_similarity(carriers[:-1], carriers[1:], dim=-1)  # [M]
    return int(sims.argmax())


def choose(logits: torch.Tensor, settings: Any, eos: torch.Tensor, number: int) -> torch.Tensor:
    """Token `number` (1 = the first new one) ``[B]`` from ``[B, V]`` logits, as generate would pick it."""
    logits = logits.float()
    if len(eos) and number <= (settings.min_new_tokens or 0):
        logits = logits.index_fill(-1, eos, float("-inf"))
    if not settings.do_sample:
        return logits.argmax(-1)
    probs = warp(logits, settings.temperature or 1.0, settings.top_k or 0, settings.top_p or 1.0).softmax(-1)
    return torch.multinomial(probs, 1).squeeze(1)
