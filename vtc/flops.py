"""Analytic FLOPs of a (pruned) vision-language model, by the formula the papers report.

Prefill FLOPs of one decoder layer that ``n`` tokens enter (hidden size ``d``, FFN size ``m``)::

    4·n·d² + 2·n²·d + 3·n·d·m        (formula="paper")

This is the convention of FastV, SparseVLM, MustDrop and DART: four ``d x d`` projections, the two
``n x n`` attention products and a gated three-matrix FFN, with one multiply-add counted as one FLOP.
``formula="gqa"`` keeps that convention but uses the true key/value width (grouped-query attention) and
the true attention width ``heads * head_dim``; it is exact for the matrix products a decoder layer runs,
which is why the tests compare it (times two, for hardware FLOPs) with ``torch.utils.flop_counter``.

The vision tower, the LM head and decode steps are reported separately, so the prefill figure stays
comparable with the papers'. Token counts come from a run (``handle.stats.flops``) or from a method's
plan (``vtc.flops("llava-1.5-7b", methods="dart.r128")``).

This module takes shapes and token counts only and imports nothing of vtc at run time, so the core
(adapters, ``TokenStats``) can use it. Turning a checkpoint name, a loaded model or a method spec into
shapes and counts needs the API layer and lives in ``vtc.measure``; ``import vtc`` makes this module
callable as that function, so ``vtc.flops(...)`` and ``vtc.flops.ModelDims`` are both public.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from vtc.state import TokenStats

Formula = Literal["paper", "gqa"]


@dataclasses.dataclass(frozen=True)
class VisionDims:
    """Shapes of a vision tower, for its FLOPs.

    Attributes:
        num_layers: transformer blocks run.
        hidden: width.
        ffn: MLP width.
        ffn_matrices: 2 for a plain MLP (CLIP), 3 for a gated one (Qwen2.5-VL).
        patches_per_token: tower tokens per LLM visual token (4 for Qwen's 2x2 merge, 1 for LLaVA).
        extra_tokens: tower tokens per image beyond the patches (CLS: 1 for CLIP).
        tokens_per_image: LLM visual tokens per image when fixed (LLaVA-1.5: 576), else None.
        projector_macs_per_token: multiply-adds of the projector per LLM visual token.
        patch_embed_macs: multiply-adds of the patch embedding per patch.
        window: patches per attention window in windowed blocks (Qwen2.5-VL), None for full attention.
        full_attention_layers: blocks that attend over the whole image when `window` is set.
        patches_per_pass: for towers that run once per fixed-size view (LLaVA-NeXT's anyres tiles and
            base view, a video's frames), the patches of one view; then each count given to ``macs`` is
            one pass, and the count is the tokens its projector maps (all patches, or a frame's pooled
            tokens where pooling comes first). None: one pass per image over its tokens' patches.
        pool_macs_per_token: multiply-adds per pooled token of a pass that pools before its projector
            (LLaVA-NeXT-Video's ``conv`` pooling; average or max pooling has none).
    """

    num_layers: int
    hidden: int
    ffn: int
    ffn_matrices: int = 2
    patches_per_token: int = 1
    extra_tokens: int = 0
    tokens_per_image: int | None = None
    projector_macs_per_token: int = 0
    patch_embed_macs: int = 0
    window: int | None = None
    full_attention_layers: int = 0
    patches_per_pass: int | None = None
    pool_macs_per_token: int = 0

    def macs(self, llm_tokens: int) -> float:
        """Multiply-adds of the tower and projector for one image giving `llm_tokens` LLM tokens (with
        ``patches_per_pass``: for one tower pass whose projector maps `llm_tokens` tokens)."""
        patches = llm_tokens * self.patches_per_token
        pooling = 0
        if self.patches_per_pass is not None:
            patches = self.patches_per_pass
            pooling = llm_tokens * self.pool_macs_per_token if llm_tokens < patches else 0
        n = patches + self.extra_tokens
        d, m = self.hidden, self.ffn
        linear = self.num_layers * (4 * n * d * d + self.ffn_matrices * n * d * m)
        full_layers = self.num_layers if self.window is None else self.full_attention_layers
        span = n if self.window is None else min(self.window, n)
        attention = full_layers * 2 * n * n * d + (self.num_layers - full_layers) * 2 * n * span * d
        projector = llm_tokens * self.projector_macs_per_token
        return float(linear + attention + patches * self.patch_embed_macs + projector + pooling)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Shapes of a VLM's language model (and vision tower) for the FLOPs formula."""

    name: str
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn_matrices: int = 3
    vision: VisionDims | None = None

    def layer_macs(self, n_q: int, n_kv: int, formula: Formula = "paper") -> float:
        """Multiply-adds of one decoder layer: `n_q` new tokens attending to `n_kv` tokens."""
        d, m = self.hidden, self.ffn
        if formula == "paper":
            return float(4 * n_q * d * d + 2 * n_q * n_kv * d + 3 * n_q * d * m)
        if formula != "gqa":
            raise ValueError(f"formula must be 'paper' or 'gqa'; got {formula!r}.")
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        proj = 2 * n_q * d * q_width + 2 * n_q * d * kv_width  # q and o; k and v
        return float(proj + 2 * n_q * n_kv * q_width + self.ffn_matrices * n_q * d * m)


# Published shapes of the checkpoints the papers report on, for FLOPs without loading a model.
_CLIP_L_336 = VisionDims(24, 1024, 4096, 2, 1, 1, 576, 1024 * 4096 + 4096 * 4096, 3 * 14 * 14 * 1024)
_QWEN2_VIT = VisionDims(32, 1280, 5120, 2, 4, 0, None, 5120 * 5120 + 5120 * 3584, 3 * 2 * 14 * 14 * 1280)
KNOWN_DIMS: dict[str, ModelDims] = {
    "llava-1.5-7b": ModelDims("llava-1.5-7b", 32, 4096, 11008, 32, 32, 128, 32064, vision=_CLIP_L_336),
    "llava-1.5-13b": ModelDims(
        "llava-1.5-13b", 40, 5120, 13824, 40, 40, 128, 32064,
        vision=dataclasses.replace(_CLIP_L_336, projector_macs_per_token=1024 * 5120 + 5120 * 5120),
    ),
    "llava-next-7b": ModelDims(
        "llava-next-7b", 32, 4096, 11008, 32, 32, 128, 32064,
        vision=dataclasses.replace(_CLIP_L_336, tokens_per_image=None),
    ),
    "qwen2-vl-2b": ModelDims(
        "qwen2-vl-2b", 28, 1536, 8960, 12, 2, 128, 151936,
        vision=dataclasses.replace(_QWEN2_VIT, projector_macs_per_token=5120 * 5120 + 5120 * 1536),
    ),
    "qwen2-vl-7b": ModelDims("qwen2-vl-7b", 28, 3584, 18944, 28, 4, 128, 152064, vision=_QWEN2_VIT),
    "qwen2.5-vl-7b": ModelDims(
        "qwen2.5-vl-7b", 28, 3584, 18944, 28, 4, 128, 152064,
        vision=VisionDims(
            32, 1280, 3420, 3, 4, 0, None, 5120 * 5120 + 5120 * 3584, 3 * 2 * 14 * 14 * 1280,
            window=(112 // 14) ** 2, full_attention_layers=4,
        ),
    ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one prefill (summed over batch rows), dense vs compressed.

    All values follow the papers' convention (one multiply-add = one FLOP); multiply by two for the
    hardware count that profilers such as ``torch.utils.flop_counter`` report.

    Attributes:
        per_layer / per_layer_dense: decoder-layer prefill FLOPs, compressed and dense.
        vision / vision_dense: vision tower and projector.
        lm_head: logits of the last prompt token of each row (what ``generate`` computes).
        decode / decode_dense: the given number of decode steps, each one token per row.
        formula: ``"paper"`` or ``"gqa"`` (see the module docstring).
    """

    per_layer: tuple[float, ...]
    per_layer_dense: tuple[float, ...]
    vision: float = 0.0
    vision_dense: float = 0.0
    lm_head: float = 0.0
    decode: float = 0.0
    decode_dense: float = 0.0
    formula: str = "paper"

    @property
    def prefill(self) -> float:
        return sum(self.per_layer)

    @property
    def prefill_dense(self) -> float:
        return sum(self.per_layer_dense)

    @property
    def prefill_ratio(self) -> float:
        """Compressed / dense prefill FLOPs of the decoder layers (the papers' figure)."""
        return self.prefill / self.prefill_dense if self.prefill_dense else 1.0

    @property
    def prefill_saved(self) -> float:
        return 1.0 - self.prefill_ratio

    @property
    def total(self) -> float:
        return self.prefill + self.vision + self.lm_head + self.decode

    @property
    def total_dense(self) -> float:
        return self.prefill_dense + self.vision_dense + self.lm_head + self.decode_dense

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(prefill=self.prefill, prefill_dense=self.prefill_dense, prefill_ratio=self.prefill_ratio)
        out.update(total=self.total, total_dense=self.total_dense)
        return out

    def __repr__(self) -> str:
        """A summary: prefill and total FLOPs, compressed against dense (the per-layer data stay on the
        attributes and in :meth:`table`)."""
        parts = [
            f"prefill {_g(self.prefill)} of {_g(self.prefill_dense)} ({self.prefill_ratio:.1%})",
            f"total {_g(self.total)} of {_g(self.total_dense)} ({self.total / (self.total_dense or 1):.1%})",
            f"{len(self.per_layer)} layers",
            f"formula={self.formula!r}",
        ]
        return f"FlopsReport({', '.join(parts)})"

    def table(self) -> str:
        """Per-layer and summary rows as aligned text."""
        rows = [f"{'layer':>6} {'dense':>12} {'compressed':>12} {'ratio':>7}"]
        for i, (c, d) in enumerate(zip(self.per_layer, self.per_layer_dense, strict=True)):
            rows.append(f"{i:>6} {_g(d):>12} {_g(c):>12} {c / d if d else 1:>7.1%}")
        for label, c, d in (
            ("prefill (decoder layers)", self.prefill, self.prefill_dense),
            ("vision tower + projector", self.vision, self.vision_dense),
            ("LM head (last token)", self.lm_head, self.lm_head),
            ("decode steps", self.decode, self.decode_dense),
            ("total", self.total, self.total_dense),
        ):
            rows.append(f"{label:<25} dense {_g(d):>10}  compressed {_g(c):>10}  ({c / d if d else 1:.1%})")
        return "\n".join(rows)


def _g(x: float) -> str:
    return f"{x:.4g}"


def decoder_flops(dims: ModelDims, tokens_per_layer: Sequence[int], formula: Formula = "paper") -> list[float]:
    """Per-layer prefill FLOPs for one sequence whose layer ``i`` sees ``tokens_per_layer[i]`` tokens."""
    if len(tokens_per_layer) != dims.num_layers:
        raise ValueError(f"expected {dims.num_layers} token counts (one per layer); got {len(tokens_per_layer)}.")
    return [dims.layer_macs(n, n, formula) for n in tokens_per_layer]


def decode_flops(dims: ModelDims, cached_per_layer: Sequence[int], steps: int, formula: Formula = "paper") -> float:
    """FLOPs of `steps` decode steps (one token each) after a prefill that cached ``cached_per_layer``."""
    total = 0.0
    for t in range(steps):
        total += sum(dims.layer_macs(1, n + t + 1, formula) for n in cached_per_layer)
        total += dims.hidden * dims.vocab
    return total


def _vision_flops(dims: ModelDims, images: Sequence[int]) -> float:
    if dims.vision is None:
        return 0.0
    return sum(dims.vision.macs(n) for n in images)


def report(
    dims: ModelDims,
    rows: Sequence[Sequence[int]],
    rows_dense: Sequence[Sequence[int]],
    images: Sequence[int] = (),
    decode_steps: int = 0,
    formula: Formula = "paper",
    prepass_rows: Sequence[Sequence[int]] = (),
    cached_rows: Sequence[Sequence[int]] | None = None,
) -> FlopsReport:
    """Build a report from per-row token counts.

    Args:
        dims: the model's shapes.
        rows: per batch row, the tokens entering each decoder layer (compressed).
        rows_dense: the same without compression.
        images: LLM visual tokens of each image in the batch (for the vision tower).
        decode_steps: decode steps to add, one token per row each.
        formula: ``"paper"`` or ``"gqa"``.
        prepass_rows: per batch row, tokens of a pre-pass through the first layers (added to compressed).
        cached_rows: per batch row, tokens each layer's KV cache holds after the prefill (default `rows`).
    """
    per_layer = [0.0] * dims.num_layers
    per_layer_dense = [0.0] * dims.num_layers
    for counts in prepass_rows:  # a pre-pass is extra work of the compressed model (GemFilter)
        for i, n in enumerate(counts):
            per_layer[i] += dims.layer_macs(n, n, formula)
    decode = decode_dense = 0.0
    cached_rows = rows if cached_rows is None else cached_rows
    for counts, dense, cached in zip(rows, rows_dense, cached_rows, strict=True):
        compressed_layers, dense_layers = decoder_flops(dims, counts, formula), decoder_flops(dims, dense, formula)
        for i, (c, d) in enumerate(zip(compressed_layers, dense_layers, strict=True)):
            per_layer[i] += c
            per_layer_dense[i] += d
        decode += decode_flops(dims, cached, decode_steps, formula)
        decode_dense += decode_flops(dims, dense, decode_steps, formula)
    vision = _vision_flops(dims, images)
    lm_head = float(len(rows) * dims.hidden * dims.vocab)
    return FlopsReport(tuple(per_layer), tuple(per_layer_dense), vision, vision, lm_head, decode, decode_dense, formula)


def report_from_stats(stats: TokenStats, dims: ModelDims, formula: Formula = "paper") -> FlopsReport:
    """The report of the forward that `stats` describes (``handle.stats.flops``)."""
    rows = [list(col) for col in zip(*stats.tokens_per_layer, strict=True)]  # [row][layer]
    prepass = [list(col) for col in zip(*stats.prepass_tokens_per_layer, strict=True)]
    # The dense model runs the whole prompt through every layer: the prompt before any stage, which a stage at
    # the embeddings (a merge, GemFilter's filter) may already have shortened at layer 0.
    # (A scan of EXTEND forwards, VideoScan's, counts each forward's own input.)
    firsts = [p[0] for p in prepass] if prepass else [r[0] for r in rows]
    if stats.input_tokens and not stats.extends and len(stats.input_tokens) == len(rows):
        firsts = [max(n, first) for n, first in zip(stats.input_tokens, firsts, strict=True)]
    dense = [[n] * dims.num_layers for n in firsts]
    images = list(stats.image_tokens)
    cached = [list(col) for col in zip(*stats.cache_tokens_per_layer, strict=True)] or None
    return report(dims, rows, dense, images, stats.decode_steps, formula, prepass, cached)


def planned_counts(
    dims: ModelDims, methods: Sequence[Any], visual_tokens: int, text_tokens: int
) -> tuple[list[int], list[int]]:
    """Tokens entering each layer for one sequence, dense and as `methods` plan to keep them.

    `methods` are ``vtc.method.Method`` instances, read only through ``plan`` and ``prune_layers``, so this
    module need not import the method layer.
    """
    dense_visual = [visual_tokens] * dims.num_layers
    visual = dense_visual
    for method in sorted(methods, key=lambda m: min(m.prune_layers(dims.num_layers), default=0)):
        visual = method.plan(visual, text_tokens)
    return [v + text_tokens for v in visual], [v + text_tokens for v in dense_visual]
