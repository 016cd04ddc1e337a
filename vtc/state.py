"""Where the visual tokens are during a forward, and the statistics a user reads after it.

``VisualTokenState`` describes the token sequence as the decoder currently sees it: for every slot,
which input position it came from, whether it is visual, and whether it takes part in attention.
Pruning stages replace it with a gathered copy; nothing in it is model-specific.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vtc.flops import FlopsReport, ModelDims


class TokenKind(enum.IntEnum):
    """What a visual token is, in ``VisualLayout.kind``."""

    PATCH = 0  # a patch (or a pooled / merged group of patches) of an image or frame
    NEWLINE = 1  # an image-newline token at the end of a grid row (anyres LLaVA-NeXT / OneVision)
    CLS = 2  # the tower's CLS token fed to the LLM (LLaVA's "full" feature strategy)
    CARRIER = 3  # a token standing for a whole frame (VideoScan)


@dataclasses.dataclass(frozen=True)
class VisualLayout:
    """Where each token of a forward sits in its image or video; methods read this, never a fixed grid.

    Attributes:
        table: ``[B, L, 8]`` integers, one row of ``FIELDS`` per token; ``-1`` for text tokens and for
            fields that do not apply (``crop`` outside anyres tiles, ``row`` / ``col`` off the grid).
        tower: ``[B, L, K]`` for visual tokens, the positions in their item's tower output sequence that the
            token stands for (LLaVA: one patch, CLS first in the tower; Qwen: the ``K = 4`` patches of its 2 x 2
            merge); ``-1`` elsewhere and as padding.
    """

    table: torch.Tensor
    tower: torch.Tensor

    #: ``item``: the image or video among the batch's features, in the order the model encodes them;
    #: ``media``: among the row's images and videos; ``modality``: 0 image, 1 video; ``frame``: temporal
    #: index (0 for images); ``crop``: anyres tile (-1 base view or none); ``row`` / ``col``: grid cell;
    #: ``kind``: a ``TokenKind``.
    FIELDS: ClassVar[tuple[str, ...]] = ("item", "media", "modality", "frame", "crop", "row", "col", "kind")

    @classmethod
    def empty(cls, batch: int, length: int, tower_width: int, device: torch.device) -> VisualLayout:
        table = torch.full((batch, length, len(cls.FIELDS)), -1, dtype=torch.long, device=device)
        return cls(table, torch.full((batch, length, tower_width), -1, dtype=torch.long, device=device))

    @classmethod
    def from_coords(cls, coords: torch.Tensor) -> VisualLayout:
        """A layout from ``[B, L, 4]`` (image, frame, row, col) of image patches (for tests and tools)."""
        layout = cls.empty(*coords.shape[:2], 1, coords.device)
        on = coords[..., 0] >= 0
        for name, column in zip(("media", "frame", "row", "col"), coords.unbind(-1), strict=True):
            layout.field(name)[:] = column
        layout.field("modality")[on] = 0
        layout.field("kind")[on] = TokenKind.PATCH
        return layout

    def field(self, name: str) -> torch.Tensor:
        """``[B, L]`` one field (a view: writes go into the table)."""
        return self.table[..., self.FIELDS.index(name)]

    @property
    def coords(self) -> torch.Tensor:
        """``[B, L, 4]`` (media within the row, frame, grid row, grid column) of grid tokens; -1 elsewhere."""
        cols = [self.FIELDS.index(n) for n in ("media", "frame", "row", "col")]
        coords = self.table[..., cols]
        on_grid = (self.field("kind") == TokenKind.PATCH) & (self.field("row") >= 0)
        return torch.where(on_grid[..., None], coords, -1)

    def gather(self, slots: torch.Tensor, filled: torch.Tensor) -> VisualLayout:
        """The layout after keeping `slots` ``[B, L']`` (padding where not `filled`)."""
        safe = slots.clamp(min=0)[..., None]
        table = self.table.gather(1, safe.expand(*safe.shape[:2], self.table.shape[-1]))
        tower = self.tower.gather(1, safe.expand(*safe.shape[:2], self.tower.shape[-1]))
        return VisualLayout(torch.where(filled[..., None], table, -1), torch.where(filled[..., None], tower, -1))


@dataclasses.dataclass(frozen=True)
class VisualTokenState:
    """The current token sequence of one forward, relative to that forward's input.

    Attributes:
        index: ``[B, L]`` position in the input sequence of each current slot; ``-1`` marks a padding
            slot that vtc added so rows keeping different counts share one length.
        visual: ``[B, L]`` the slot holds a visual (image or video) token.
        valid: ``[B, L]`` the slot takes part in attention (the user's attention mask, and not a vtc slot).
        ordinal: ``[B, L]`` for visual slots, the index of the token among its row's visual tokens in the
            input (the patch order, for plots); ``-1`` elsewhere.
        layout: where each slot's token sits in its image or video; None when the adapter cannot tell.
    """

    index: torch.Tensor
    visual: torch.Tensor
    valid: torch.Tensor
    ordinal: torch.Tensor
    layout: VisualLayout | None = None

    @classmethod
    def initial(
        cls, visual: torch.Tensor, valid: torch.Tensor, layout: VisualLayout | torch.Tensor | None = None
    ) -> VisualTokenState:
        """The state of an unpruned input: slot i holds input position i.

        `layout` may also be ``[B, L, 4]`` grid coordinates (image, frame, row, col) of image patches.
        """
        batch, length = visual.shape
        index = torch.arange(length, device=visual.device).expand(batch, length)
        ordinal = torch.where(visual, visual.long().cumsum(dim=1) - 1, -1)
        if isinstance(layout, torch.Tensor):
            layout = VisualLayout.from_coords(layout)
        return cls(index=index, visual=visual, valid=valid & torch.ones_like(visual), ordinal=ordinal, layout=layout)

    @property
    def coords(self) -> torch.Tensor | None:
        """``[B, L, 4]`` (image within the row, frame, grid row, grid column) of grid tokens; -1 elsewhere."""
        return self.layout.coords if self.layout is not None else None

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @property
    def length(self) -> int:
        return self.index.shape[1]

    def num_visual(self) -> torch.Tensor:
        """``[B]`` visual tokens that take part in attention, per row."""
        return (self.visual & self.valid).sum(dim=1)

    def num_tokens(self) -> torch.Tensor:
        """``[B]`` tokens that take part in attention, per row."""
        return self.valid.sum(dim=1)

    def gather(self, slots: torch.Tensor, filled: torch.Tensor) -> VisualTokenState:
        """The state after keeping `slots`.

        Args:
            slots: ``[B, L']`` indices into the current sequence (any value where not `filled`).
            filled: ``[B, L']`` false for padding slots added by the caller.
        """
        safe = slots.clamp(min=0)
        pick = lambda t: t.gather(1, safe)  # noqa: E731  [B, L] -> [B, L']
        return VisualTokenState(
            index=torch.where(filled, pick(self.index), -1),
            visual=pick(self.visual) & filled,
            valid=pick(self.valid) & filled,
            ordinal=torch.where(filled, pick(self.ordinal), -1),
            layout=self.layout.gather(slots, filled) if self.layout is not None else None,
        )

    def grids(self, row: int, present: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, int]]:
        """The complete grids of row `row`: for each image, frame and crop (the base view or an anyres
        tile), its slots in raster order.

        Args:
            row: the batch row.
            present: ``[L]`` slots to consider (e.g. visual tokens not yet merged away).

        Yields:
            ``(slots, rows, cols)``: ``[rows * cols]`` slot indices of a grid whose every cell is present.
            Images that lost tokens already (an earlier stage) are not grids any more and are skipped.
        """
        if self.coords is None:
            raise ValueError("this model family does not report where visual tokens sit in their image.")
        coords = self.coords[row]
        crop = self.layout.field("crop")[row]
        keys = torch.cat([coords[:, :2], crop[:, None]], dim=1)  # (image, frame, crop): anyres tiles are own grids
        for key in torch.unique(keys[present & (coords[:, 0] >= 0)], dim=0):
            slots = (present & (keys == key).all(dim=1)).nonzero().flatten()
            rows, cols = int(coords[slots, 2].max()) + 1, int(coords[slots, 3].max()) + 1
            if len(slots) == rows * cols:
                yield slots, rows, cols

    def kept_visual(self) -> list[torch.Tensor]:
        """Per row, the ordinals (patch indices) of the visual tokens still present, ascending."""
        keep = self.visual & self.valid
        return [self.ordinal[b][keep[b]].cpu() for b in range(self.batch_size)]

    def kept_positions(self) -> list[torch.Tensor]:
        """Per row, the input positions of the visual tokens still present, ascending."""
        keep = self.visual & self.valid
        return [self.index[b][keep[b]].cpu() for b in range(self.batch_size)]

    def kept_tokens(self) -> list[torch.Tensor]:
        """Per row, the input positions of every token still present (vtc's padding slots excluded)."""
        return [self.index[b][self.index[b] >= 0].cpu() for b in range(self.batch_size)]


@dataclasses.dataclass
class StageRecord:
    """What one pruning stage kept, per batch row.

    Attributes:
        method: the method's registered name.
        layer: the decoder layer whose input the stage pruned (0 = the embeddings).
        kept_visual: per row, ordinals of the visual tokens kept (patch indices into the image/video grid).
        kept_positions: per row, input positions of the visual tokens kept.
        visual_before: per row, visual tokens present before the stage.
        kept_tokens: per row, input positions of every token kept (text included), ascending.
        kind: the forward the stage ran in: ``"prefill"``, or ``"extend"`` (new tokens over a cache; its
            positions count from that forward's first token).
    """

    method: str
    layer: int
    kept_visual: list[torch.Tensor]
    kept_positions: list[torch.Tensor]
    visual_before: list[int]
    kept_tokens: list[torch.Tensor] = dataclasses.field(default_factory=list)
    kind: str = "prefill"

    @property
    def visual_after(self) -> list[int]:
        return [len(k) for k in self.kept_visual]


@dataclasses.dataclass
class SpeculativeStats:
    """What a speculative ``generate`` did (see ``vtc.methods.specdec``).

    Attributes:
        k: tokens drafted per round (the largest, when adaptive).
        rounds: verify forwards of the target (each one EXTEND forward of up to k + 1 tokens).
        tokens: new tokens of the longest row (a row that ended earlier pads).
        drafted: draft tokens proposed per row, summed over rounds.
        accepted: draft tokens kept per row, summed over rounds, averaged over the rows (with
            ``pacing="batch"`` every row keeps the batch's smallest number).
        row_accepted: per row, the draft tokens it kept, summed over rounds. With ``pacing="row"`` each row
            advances by its own count, which equals its batch-1 run's.
        draft_seconds / target_seconds / total_seconds: wall time in the draft's forwards, the target's
            forwards (prefill included), and the whole call.
    """

    k: int
    rounds: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: float = 0
    row_accepted: list[int] = dataclasses.field(default_factory=list)
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        """New tokens per target forward, the prefill (which yields the first token) included."""
        return self.tokens / (self.rounds + 1) if self.tokens else 0.0

    @property
    def accepted_per_round(self) -> float:
        """Tokens each verify forward added: accepted drafts plus the target's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def target_forwards_per_token(self) -> float:
        return (self.rounds + 1) / self.tokens if self.tokens else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_share(self) -> float:
        """Share of the call's wall time spent in the draft."""
        return self.draft_seconds / self.total_seconds if self.total_seconds else 0.0

    def summary(self) -> str:
        return (
            f"speculative k={self.k}: {self.tokens} tokens in {self.rounds + 1} target forwards "
            f"({self.tokens_per_target_forward:.2f} per forward, {self.accepted_per_round:.2f} per verify), "
            f"acceptance {self.acceptance_rate:.1%}, draft {self.draft_share:.1%} of the time"
        )


@dataclasses.dataclass
class ScanStats:
    """What a streaming scan did (see ``vtc.methods.videoscan``): frames fed, the carrier bank, the cache.

    Attributes:
        frames: per row, the frames fed so far (a Qwen frame is one temporal patch of two video frames).
        carriers: per row, the carriers in the memory bank now.
        evicted: per row, carriers dropped from the bank (with the frame tokens they kept).
        kept_tokens: per row, frame tokens kept beside the carriers ("+" mode).
        forwards: forwards of the text backbone the scan ran (one per frame, plus the text between).
        cache_slots: slots of each layer's KV cache after the scan (padding slots of a batch included).
        cache_bytes: bytes of the KV cache's keys and values after the scan, all layers.
        peak_cache_bytes: the most the cache held during the scan (just before a frame's tokens left it).
    """

    frames: list[int] = dataclasses.field(default_factory=list)
    carriers: list[int] = dataclasses.field(default_factory=list)
    evicted: list[int] = dataclasses.field(default_factory=list)
    kept_tokens: list[int] = dataclasses.field(default_factory=list)
    forwards: int = 0
    cache_slots: int = 0
    cache_bytes: int = 0
    peak_cache_bytes: int = 0

    def summary(self) -> str:
        return (
            f"scan: frames {self.frames}, carriers {self.carriers} (evicted {self.evicted}), kept frame tokens "
            f"{self.kept_tokens}; cache {self.cache_slots} slots, {self.cache_bytes / 2**20:.2f} MiB "
            f"(peak {self.peak_cache_bytes / 2**20:.2f} MiB) after {self.forwards} forwards"
        )


@dataclasses.dataclass
class TokenStats:
    """Statistics of the last prefill (and the decode steps that followed it).

    Attributes:
        tokens_per_layer: ``[layer][row]`` tokens entering each decoder layer that take part in attention
            (the ``n`` of the FLOPs formula).
        visual_per_layer: ``[layer][row]`` visual tokens entering each decoder layer.
        seq_len_per_layer: ``[layer]`` the tensor length each layer computed on (padding included).
        stages: one record per pruning stage that ran, in execution order.
        backends: kernel op -> backend that ran it (``"torch"`` or ``"triton"``).
        decode_steps: forwards after the prefill that reused its cache (one-token decodes and extends).
        extends: of those, the forwards of several new tokens (a chat turn, a verify step, a video chunk).
        extra_forwards: forwards a decoding method ran beyond the model's own.
        image_tokens: LLM visual tokens of each image (or video) in the batch, for the vision FLOPs.
        input_tokens: per row, the prompt's tokens before any stage ran (the dense model's count).
        prepass_tokens_per_layer: ``[layer][row]`` tokens of a method's pre-pass (GemFilter runs layers
            0..r on the full input before the real forward); empty when none ran.
        cache_tokens_per_layer: ``[layer][row]`` tokens each layer's KV cache holds after the prefill
            (fewer than it computed on when a method trims the cache); empty without a cache.
    """

    tokens_per_layer: list[list[int]] = dataclasses.field(default_factory=list)
    visual_per_layer: list[list[int]] = dataclasses.field(default_factory=list)
    seq_len_per_layer: list[int] = dataclasses.field(default_factory=list)
    stages: list[StageRecord] = dataclasses.field(default_factory=list)
    backends: dict[str, str] = dataclasses.field(default_factory=dict)
    decode_steps: int = 0
    extends: int = 0
    extra_forwards: int = 0
    image_tokens: list[int] = dataclasses.field(default_factory=list)
    input_tokens: list[int] = dataclasses.field(default_factory=list)
    prepass_tokens_per_layer: list[list[int]] = dataclasses.field(default_factory=list)
    cache_tokens_per_layer: list[list[int]] = dataclasses.field(default_factory=list)
    dims: ModelDims | None = dataclasses.field(default=None, repr=False)
    #: Set by speculative decoding after its ``generate`` returns.
    speculative: SpeculativeStats | None = None
    #: Set by a streaming scan (VideoScan) after it fed its input: frames, carriers, KV cache bytes.
    scan: ScanStats | None = None

    @property
    def batch_size(self) -> int:
        return len(self.tokens_per_layer[0]) if self.tokens_per_layer else 0

    def layer_averaged_visual(self) -> list[float]:
        """Per row, the mean over layers of the visual tokens left *after* each layer's pruning.

        This is the count SparseVLM and MustDrop call their budget ("equivalent tokens"): layer i's
        count after pruning is what enters layer i + 1 (the last layer keeps its own).
        """
        after = [*self.visual_per_layer[1:], self.visual_per_layer[-1]]
        return [sum(col) / len(col) for col in zip(*after, strict=True)]

    def kept_visual(self, stage: int = -1) -> list[torch.Tensor]:
        """Per row, the patch indices kept by `stage` (default: the last stage)."""
        if not self.stages:
            raise ValueError("no pruning stage ran in the last forward; nothing was dropped.")
        return self.stages[stage].kept_visual

    @property
    def flops(self) -> FlopsReport:
        """Prefill FLOPs of the last forward, dense vs compressed, by the papers' per-layer formula."""
        from vtc.flops import report_from_stats

        if self.dims is None or not self.tokens_per_layer:
            raise ValueError("no forward has run through the wrapped model yet; run one before reading FLOPs.")
        return report_from_stats(self, self.dims)

    def summary(self) -> str:
        """A few human-readable lines: tokens per layer (row 0), stages, backends, FLOPs saved."""
        if not self.tokens_per_layer:
            return "TokenStats(no forward yet)"
        lines = [
            f"batch {self.batch_size}, {len(self.tokens_per_layer)} layers, decode steps {self.decode_steps}",
            "tokens entering each layer (row 0): " + " ".join(str(r[0]) for r in self.tokens_per_layer),
        ]
        for s in self.stages:
            lines.append(f"stage {s.method}@{s.layer}: visual {s.visual_before} -> {s.visual_after}")
        if self.stages:
            averaged = ", ".join(f"{x:.1f}" for x in self.layer_averaged_visual())
            lines.append(f"layer-averaged visual tokens per row: {averaged}")
        if self.backends:
            lines.append("backends: " + ", ".join(f"{k}={v}" for k, v in sorted(self.backends.items())))
        if self.dims is not None:
            f = self.flops
            lines.append(f"prefill FLOPs {f.prefill:.4g} vs dense {f.prefill_dense:.4g} ({f.prefill_ratio:.1%})")
        if self.speculative is not None:
            lines.append(self.speculative.summary())
        if self.scan is not None:
            lines.append(self.scan.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
