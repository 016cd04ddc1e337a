"""The one-call entry points: ``wrap``, ``apply`` and the ``Handle`` they return."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from vtc import surface
from vtc.adapters import ADAPTERS, Adapter, adapter_for
from vtc.compose import Pipeline
from vtc.config import MethodConfig, MethodSpec, resolve
from vtc.engine.dispatch import ModelSessions
from vtc.engine.session import Session
from vtc.method import METHODS, Method, get_method
from vtc.state import TokenStats


def as_config_list(methods: MethodSpec | Sequence[MethodSpec], **overrides: Any) -> list[MethodConfig]:
    """Resolve one spec or a list of specs into configs (see ``vtc.config.resolve``)."""
    specs = [methods] if isinstance(methods, (str, MethodConfig, Mapping)) else list(methods)
    if not specs:
        raise ValueError("no method given; pass a name like 'dart.r128' or a list of them.")
    if overrides and len(specs) != 1:
        raise ValueError(
            "keyword settings apply to a single method; with several methods pass each one's settings in a "
            "config, e.g. vtc.wrap(model, [vtc.resolve('dart', keep=64), 'other'])."
        )
    return [resolve(spec, **overrides) for spec in specs]


class Handle:
    """A wrapped model's session: its methods, the statistics of its last forward, and ``remove()``.

    A model may carry several sessions (two pipelines, or a pruned draft beside the dense model); the
    newest is active, ``activate()`` switches to another, ``deactivate()`` runs the model unwrapped.

    Attributes:
        model: the wrapped model (changed in place).
        adapter: the model family's adapter.
        methods: the method instances, in the order given.
        session: the session that runs them.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method], session: Session) -> None:
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.session = session

    @property
    def configs(self) -> tuple[MethodConfig, ...]:
        return tuple(m.config for m in self.methods)

    @property
    def config(self) -> MethodConfig | tuple[MethodConfig, ...]:
        """The method's config, or a tuple of configs when several methods run."""
        return self.configs[0] if len(self.methods) == 1 else self.configs

    @property
    def stats(self) -> TokenStats:
        """Token counts, kept indices, kernel backends and FLOPs of the last forward."""
        return self.session.stats

    @property
    def removed(self) -> bool:
        owner = ModelSessions.find(self.model)
        return owner is None or self.session not in owner.sessions

    @property
    def active(self) -> bool:
        """This session is the one the model runs now."""
        owner = ModelSessions.find(self.model)
        return owner is not None and owner.active is self.session

    def activate(self) -> Handle:
        """Make this session the one the model runs (the others keep their hooks, idle)."""
        self._owner().active = self.session
        return self

    def deactivate(self) -> Handle:
        """Run the model unwrapped until a session is activated again (if this one is active)."""
        owner = self._owner()
        if owner.active is self.session:
            owner.active = None
        return self

    @contextlib.contextmanager
    def activated(self) -> Iterator[Handle]:
        """Run this session for the duration of a ``with`` block, then the one that ran before."""
        owner = self._owner()
        before, owner.active = owner.active, self.session
        try:
            yield self
        finally:
            if not self.removed:
                owner.active = before if before is None or before in owner.sessions else owner.active

    def _owner(self) -> ModelSessions:
        if self.removed:
            raise RuntimeError("this handle was removed; wrap the model again with vtc.wrap.")
        return ModelSessions.find(self.model)

    def remove(self) -> None:
        """Remove this session's hooks; with no session left the model is exactly as it was. Idempotent."""
        owner = ModelSessions.find(self.model)
        if owner is not None:
            owner.remove(self.session)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active" if self.active else "idle"
        names = ", ".join(m.name for m in self.methods)
        return f"Handle({type(self.model).__name__}, [{names}], {state})"


def wrap(model: nn.Module, methods: MethodSpec | Sequence[MethodSpec], /, **overrides: Any) -> Handle:
    """Insert vtc methods into a loaded model, in place.

    Stock ``model(...)`` and ``model.generate(...)`` then run with the methods active, for any batch size.
    Wrapping a model again adds a second session, which becomes the active one (see ``Handle.activate``).

    Args:
        model: a supported ``*ForConditionalGeneration`` model (see ``vtc.list_adapters()``).
        methods: a method spec (``"dart"``, ``"dart.r128"``, a ``MethodConfig``) or a list of them.
        **overrides: settings of a single method, e.g. ``keep=64``.

    Returns:
        A ``Handle``; ``handle.remove()`` takes the session away (the model is exactly as before once
        no session is left).

    Raises:
        UnsupportedModelError: the model family has no adapter.
        UnknownMethodError: a method or preset name is not registered.
        ValueError: a setting is out of range for the method or this model.
        MethodConflictError: two methods that cannot run together (two decoding loops, two edits of a layer).
        UnsupportedTransformersError: the installed transformers moved an internal vtc relies on.
    """
    configs = as_config_list(methods, **overrides)
    owner = ModelSessions.find(model)
    adapter = owner.adapter if owner is not None else adapter_for(model)
    # Before any hook goes in: an unrecognised transformers raises here, not deep inside a forward.
    surface.check(adapter.text_model, adapter.layers)
    session = Session(model, adapter)
    bound = []
    for config in configs:
        method = get_method(config.method)(config)
        method.bind(session.bound)
        bound.append(method)
    session.set_pipeline(Pipeline(bound, adapter.num_layers))
    ModelSessions.of(model, adapter).add(session)
    return Handle(model, adapter, bound, session)


@contextlib.contextmanager
def apply(model: nn.Module, methods: MethodSpec | Sequence[MethodSpec], /, **overrides: Any) -> Iterator[Handle]:
    """``wrap`` for the duration of a ``with`` block; the model is restored on exit, also on error."""
    handle = wrap(model, methods, **overrides)
    try:
        yield handle
    finally:
        handle.remove()


def list_methods(presets: bool = False) -> list[str]:
    """Registered method names; with `presets`, also every ``name.preset``."""
    import vtc.methods  # noqa: F401

    names = METHODS.names()
    if not presets:
        return names
    return sorted(names + [f"{n}.{p}" for n in names for p in METHODS.get(n).presets])


def list_adapters() -> list[str]:
    """Registered adapter names (model families)."""
    return ADAPTERS.names()
