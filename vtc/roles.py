"""The roles a method can play, discovered by protocol when a model is wrapped.

A method plays a role by implementing its hook methods; the pipeline (``vtc.compose``) indexes methods
by role and refuses conflicts (two generators, two edits of one layer) when wrapping, never mid-run.

Roles of the ``Method`` base, found by the layers a method names:

- VisionStage: ``vision_layers`` + ``vision_select``: keep or merge tokens inside the vision tower.
- Stage: ``prune_layers`` + ``select``: keep a subset of the tokens entering a decoder layer.
- Tap: ``tap_layers`` + ``on_attention``: read attention rows of a layer (``AttentionCall.rows``).
- Reader: ``read_layers`` + ``on_layer_input``: read a layer's input hidden states.
- AttentionEdit: ``edit_layers`` + ``edit_attention``: change a layer's post-softmax weights.
- SparseAttention: ``sparse_layers`` + ``sparse_attention``: compute a prefill attention call's output
  itself (attention among a subset of the tokens); one owner per layer, edits included.
- OutputHook: ``on_output``: replace the model's output after a call (decoding through stock ``generate``).

Roles found by the protocols below:

- CacheHook: acts on the KV cache after each forward through a ``CacheView`` (evict, quantize, crop).
- Generator: owns the decoding loop; installed as the model instance's ``generate`` while its session is
  active, and restored by ``remove()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from vtc.engine.cache import CacheView
    from vtc.engine.record import ForwardKind


@runtime_checkable
class CacheHook(Protocol):
    """Acts on the KV cache after a forward of the text backbone."""

    def on_cache(self, view: CacheView, kind: ForwardKind) -> None:
        """Evict, quantize or crop through `view` after a forward of `kind` wrote the cache."""


@runtime_checkable
class Generator(Protocol):
    """Owns the decoding loop of its model."""

    def generate(self, model: Any, stock: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Decode. `model` is the bound adapter (``.model`` is the wrapped model, ``.run_extra`` runs it
        once more); `stock` is transformers' own ``generate`` of the model, for loops that delegate."""
