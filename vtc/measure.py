"""FLOPs of a named checkpoint or a loaded model under method specs: ``vtc.flops(model, methods)``.

``vtc.flops`` (the module) holds the analytic formula and takes only shapes and token counts, so the
core (adapters, ``TokenStats``) can use it without knowing about specs, the method registry or
``Handle``. Turning a user's arguments (a checkpoint name, a loaded model, a ``Handle``, ``"dart.r128"``)
into those shapes and counts needs the API layer, so it lives here, beside ``vtc.api``; ``import vtc``
makes the module ``vtc.flops`` callable through ``FlopsModule`` so that ``vtc.flops("llava-1.5-7b",
"dart.r128")`` and ``vtc.flops.ModelDims`` both work.
"""

from __future__ import annotations

import types
from typing import Any

from vtc.adapters import adapter_for
from vtc.api import Handle, as_config_list
from vtc.flops import KNOWN_DIMS, FlopsReport, Formula, ModelDims, planned_counts, report, report_from_stats
from vtc.method import Method, get_method
from vtc.registry import suggest


def flops(
    model: Any,
    methods: Any = None,
    *,
    visual_tokens: int | None = None,
    text_tokens: int = 64,
    images: int = 1,
    decode_steps: int = 0,
    formula: Formula = "paper",
) -> FlopsReport:
    """Analytic FLOPs of a model, dense vs compressed by `methods`, for one sequence.

    Args:
        model: a known checkpoint name (``vtc.flops.KNOWN_DIMS``: "llava-1.5-7b", "qwen2-vl-7b", ...),
            a ``vtc.flops.ModelDims``, a supported transformers model, or a ``vtc.Handle`` (then the measured
            counts of its last forward are used and the other arguments are ignored).
        methods: method spec(s) as ``vtc.wrap`` takes them; None for dense only.
        visual_tokens: LLM visual tokens of the input (default: the model's tokens per image x `images`).
        text_tokens: text tokens of the prompt (the papers' prompts are 40-70 tokens).
        images: images in the input, for the vision tower.
        decode_steps: generated tokens to add.
        formula: ``"paper"`` (comparable with published numbers) or ``"gqa"``.

    Raises:
        ValueError: an unknown checkpoint name, a model without a fixed visual count and no
            `visual_tokens`, or negative token counts.
    """
    if isinstance(model, Handle):
        return report_from_stats(model.stats, model.adapter.dims(), formula)
    dims = _dims_of(model)
    if visual_tokens is None:
        per_image = dims.vision.tokens_per_image if dims.vision else None
        if per_image is None:
            raise ValueError(f"{dims.name} has no fixed tokens per image; pass visual_tokens=.")
        visual_tokens = per_image * images
    if visual_tokens < 0 or text_tokens < 0:
        raise ValueError("visual_tokens and text_tokens must be non-negative.")
    bound = _plan_methods(methods)
    counts, dense = planned_counts(dims, bound, visual_tokens, text_tokens)
    per_image = [visual_tokens // images] * images if images else []
    prepass = [r for m in bound if (r := m.prepass_layer(dims.num_layers)) is not None]
    # A pre-pass runs only when some token goes (GemFilter skips it per forward otherwise).
    prepass_rows = [[dense[0]] * (prepass[0] + 1)] if prepass and counts != dense else []
    return report(dims, [counts], [dense], per_image, decode_steps, formula, prepass_rows)


def _plan_methods(methods: Any) -> list[Method]:
    """Method instances for `methods` (specs as ``vtc.wrap`` takes them), unbound: only their plans are read."""
    if methods is None:
        return []
    return [get_method(c.method)(c) for c in as_config_list(methods)]


def _dims_of(model: Any) -> ModelDims:
    """The shapes of `model`: given as ``ModelDims``, a known checkpoint name, or a loaded model's adapter."""
    if isinstance(model, ModelDims):
        return model
    if isinstance(model, str):
        if model not in KNOWN_DIMS:
            raise ValueError(
                f"unknown model {model!r}.{suggest(model, sorted(KNOWN_DIMS))} Known: {', '.join(sorted(KNOWN_DIMS))}; "
                f"or pass a loaded model or a vtc.flops.ModelDims."
            )
        return KNOWN_DIMS[model]
    return adapter_for(model).dims()


class FlopsModule(types.ModuleType):
    """The class ``import vtc`` gives the module ``vtc.flops``: a module that is also ``flops()`` above.

    Users write both ``vtc.flops("llava-1.5-7b", "dart.r128")`` (the README's one-liner) and
    ``vtc.flops.ModelDims``; one attribute cannot be a function and a module, so the module is made
    callable. The class is assigned from the API layer (``vtc/__init__.py``) rather than by ``vtc.flops``
    itself, because calling needs the spec and adapter resolution above, which the core must not import.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> FlopsReport:
        """``vtc.measure.flops(*args, **kwargs)``."""
        return flops(*args, **kwargs)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes the KV cache `cache` (what ``model(..., use_cache=True).past_key_values`` returns) holds: every
    layer's keys and values as stored, so a pruned cache counts its kept tokens and a quantized one its
    packed codes, scales and zeros."""
    from vtc import surface

    return surface.cache_nbytes(cache)
