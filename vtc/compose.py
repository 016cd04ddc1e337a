"""Running several methods in one model: hook order and conflict rules.

Pruning stages run in layer order; stages at the same layer run in the order the user listed them, each
on the tokens the previous one kept. Attention taps are read-only and any number may share a layer.
What cannot be composed raises ``MethodConflictError`` when the model is wrapped, never mid-run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from vtc.engine.record import ForwardKind
from vtc.errors import MethodConflictError
from vtc.method import AttentionCall, HookPoint, LayerContext, Method, StepContext
from vtc.roles import CacheHook, Generator
from vtc.state import VisualTokenState

if TYPE_CHECKING:
    from vtc.engine.cache import CacheView


class Pipeline:
    """The methods of one wrapped model, indexed by where they act.

    Args:
        methods: bound methods, in the order the user gave them.
        num_layers: decoder layers of the model.
    """

    def __init__(self, methods: Sequence[Method], num_layers: int) -> None:
        self.methods = list(methods)
        names = [m.name for m in self.methods]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise MethodConflictError(
                f"method {repeated[0]!r} is listed twice; give it once with the settings you want."
            )
        loops = [m for m in self.methods if isinstance(m, Generator)]
        steps = [m for m in self.methods if HookPoint.GENERATE in m.hooks and not isinstance(m, Generator)]
        for owners in (loops, steps):
            if len(owners) > 1:
                raise MethodConflictError(
                    f"{' and '.join(m.name for m in owners)} each replace the decoding loop; only one decoding "
                    f"method can run."
                )
        if loops and steps:
            _check_loop_with_step(loops[0], steps[0])
        for m in self.methods:
            m.check_company([o for o in self.methods if o is not m])
        #: The method that owns the decoding loop (installed as the model's ``generate``), if any.
        self.generator: Generator | None = next((m for m in self.methods if isinstance(m, Generator)), None)
        #: Methods that act on the KV cache after a forward, in the order given.
        self.cache_hooks: list[CacheHook] = [m for m in self.methods if isinstance(m, CacheHook)]
        #: Some method removes tokens, so caches and masks must stay consistent.
        self.prunes = any(m.prunes for m in self.methods)
        self._stages: dict[int, list[Method]] = defaultdict(list)
        self._taps: dict[int, list[Method]] = defaultdict(list)
        for m in self.methods:
            for layer in m.prune_layers(num_layers):
                self._stages[layer].append(m)
            for layer in m.tap_layers(num_layers):
                self._taps[layer].append(m)
        # Stages that also prune the new tokens of extend forwards (a later image, a streamed chunk).
        self._extend_stages = {i: [m for m in ms if m.extends] for i, ms in self._stages.items()}
        self._extend_stages = {i: ms for i, ms in self._extend_stages.items() if ms}
        self._extend_taps = {i: [m for m in ms if m.extends] for i, ms in self._taps.items()}
        self._extend_taps = {i: ms for i, ms in self._extend_taps.items() if ms}
        self._reads: dict[int, list[Method]] = defaultdict(list)
        self._edits: dict[int, Method] = {}
        for m in self.methods:
            for layer in m.read_layers(num_layers):
                self._reads[layer].append(m)
            for layer in m.edit_layers(num_layers):
                if layer in self._edits:
                    raise MethodConflictError(
                        f"{self._edits[layer].name} and {m.name} both edit the attention weights of layer {layer}; "
                        f"only one method may edit a layer's attention."
                    )
                self._edits[layer] = m
        self._sparse: dict[int, Method] = {}
        for m in self.methods:
            for layer in m.sparse_layers(num_layers):
                owner = self._sparse.get(layer) or self._edits.get(layer)
                if owner is not None:
                    raise MethodConflictError(
                        f"{owner.name} and {m.name} both change how layer {layer} attends; only one method may "
                        f"edit or replace a layer's attention."
                    )
                self._sparse[layer] = m
        self.output_methods = [m for m in self.methods if type(m).on_output is not Method.on_output]
        self.text_output_methods = [m for m in self.methods if type(m).on_text_output is not Method.on_text_output]
        self._vision_stages: dict[int, list[Method]] = defaultdict(list)
        self._vision_taps: dict[int, list[Method]] = defaultdict(list)

        prepasses = {m.name: r for m in self.methods if (r := m.prepass_layer(num_layers)) is not None}
        if len(prepasses) > 1:
            raise MethodConflictError(f"{' and '.join(prepasses)} each need their own pre-pass; use one of them.")
        self.prepass_layer: int | None = next(iter(prepasses.values()), None)
        self._prepass_owner = next((m for m in self.methods if m.name in prepasses), None)
        trims = [r for m in self.methods if (r := m.cache_trim_from(num_layers)) is not None]
        self.cache_trim_from: int | None = min(trims, default=None)
        if self._edits and self.cache_trim_from is not None:
            # An edit reads the prompt's key columns in decode steps as the prefill laid them out.
            raise MethodConflictError(
                f"{self._edits[min(self._edits)].name} edits attention over the prompt's cached keys, which "
                f"{', '.join(m.name for m in self.methods if m.cache_trim_from(num_layers) is not None)} "
                f"re-orders after the prefill; use a pruning method that keeps its KV cache."
            )

    def needs_prepass(self, state: VisualTokenState) -> bool:
        """Whether this prefill runs the pre-pass: its owner may know that no row can lose a token."""
        return self._prepass_owner is not None and self._prepass_owner.needs_prepass(state)

    def bind_vision(self, num_layers: int) -> None:
        """Index the methods' vision-tower stages and taps for a tower of `num_layers` layers."""
        for m in self.methods:
            for layer in m.vision_layers(num_layers):
                self._vision_stages[layer].append(m)
            for layer in m.vision_tap_layers(num_layers):
                self._vision_taps[layer].append(m)

    @property
    def vision_stage_layers(self) -> list[int]:
        return sorted(self._vision_stages)

    @property
    def vision_tap_layers(self) -> list[int]:
        return sorted(self._vision_taps)

    def vision_stages_at(self, layer: int) -> list[Method]:
        return self._vision_stages.get(layer, [])

    def on_vision_start(self) -> None:
        for m in self.methods:
            m.on_vision_start()

    def on_vision_attention(self, call: AttentionCall) -> None:
        for m in self._vision_taps.get(call.layer_idx, []):
            m.on_vision_attention(call)

    @property
    def stage_layers(self) -> list[int]:
        return sorted(self._stages)

    @property
    def tap_layers(self) -> list[int]:
        return sorted(self._taps)

    def stages_at(self, layer: int) -> list[Method]:
        return self._stages.get(layer, [])

    def extend_stages_at(self, layer: int) -> list[Method]:
        return self._extend_stages.get(layer, [])

    def stage_layers_for(self, kind: ForwardKind) -> dict[int, list[Method]]:
        """Layers with stages that act in a forward of `kind` (none in a decode step)."""
        if kind is ForwardKind.PREFILL:
            return self._stages
        return self._extend_stages if kind is ForwardKind.EXTEND else {}

    @property
    def extend_tap_layers(self) -> list[int]:
        return sorted(self._extend_taps)

    def on_forward_start(self) -> None:
        for m in self.methods:
            m.on_forward_start()

    def on_attention(self, call: AttentionCall, *, extend: bool = False) -> None:
        for m in (self._extend_taps if extend else self._taps).get(call.layer_idx, []):
            m.on_attention(call)

    def on_cache(self, view: CacheView, kind: ForwardKind) -> None:
        for m in self.cache_hooks:
            m.on_cache(view, kind)

    @property
    def read_layers(self) -> list[int]:
        return sorted(self._reads)

    @property
    def edit_layers(self) -> list[int]:
        return sorted(self._edits)

    @property
    def sparse_layers(self) -> list[int]:
        return sorted(self._sparse)

    def sparse_attention(self, call: AttentionCall) -> torch.Tensor | None:
        method = self._sparse.get(call.layer_idx)
        return method.sparse_attention(call) if method is not None else None

    def on_layer_input(self, ctx: LayerContext) -> None:
        for m in self._reads.get(ctx.layer_idx, []):
            m.on_layer_input(ctx)

    def edit_attention(self, call: AttentionCall) -> Callable[[torch.Tensor], torch.Tensor] | None:
        method = self._edits.get(call.layer_idx)
        return method.edit_attention(call) if method is not None else None

    def on_text_output(self, hidden: torch.Tensor, state: VisualTokenState) -> None:
        for m in self.text_output_methods:
            m.on_text_output(hidden, state)

    def on_output(self, step: StepContext) -> Any | None:
        """Let each output method replace the output in turn (at most one owns GENERATE)."""
        replaced = None
        for m in self.output_methods:
            new = m.on_output(
                step if replaced is None else StepContext(step.kwargs, replaced, step.prefill, step.adapter)
            )
            replaced = new if new is not None else replaced
        return replaced


def _check_loop_with_step(loop: Method, step: Method) -> None:
    """A Generator beside an output hook that changes each decoding step: allowed when the loop decodes
    through output hooks (``applies_output_hooks``) and the hook corrects each position on its own."""
    if getattr(loop, "applies_output_hooks", False) and step.per_position:
        return
    if not getattr(loop, "applies_output_hooks", False):
        raise MethodConflictError(
            f"{loop.name} replaces the decoding loop and {step.name} changes each step of it; only one decoding "
            f"method can run."
        )
    reason = f" ({step.single_step_reason})" if step.single_step_reason else ""
    raise MethodConflictError(
        f"{loop.name} scores several tokens in one forward and can only decode through an output hook that "
        f"corrects each position on its own; {step.name} cannot be applied that way{reason}. Use {step.name} "
        f"with stock generate, or {loop.name} without it."
    )
