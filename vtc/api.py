"""The one-call entry points: ``wrap``, ``apply`` and the ``Handle`` they return."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from vtc import surface
from vtc.adapters import ADAPTERS, Adapter, adapter_for
from vtc.compose import Pipeline
from vtc.config import MethodConfig, MethodSpec, resolve
from vtc.errors import AlreadyWrappedError
from vtc.method import METHODS, Method, get_method
from vtc.state import TokenStats

_WRAPPED: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()


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
    """A wrapped model: its methods, the statistics of its last forward, and ``remove()``.

    Attributes:
        model: the wrapped model (changed in place).
        adapter: the model family's adapter.
        methods: the method instances, in the order given.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, methods: list[Method]) -> None:
        self.model = model
        self.adapter = adapter
        self.methods = methods

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
        return self.adapter.stats

    @property
    def active(self) -> bool:
        return _WRAPPED.get(self.model) is self

    def remove(self) -> None:
        """Remove every hook and restore the model exactly as it was. Calling it twice is harmless."""
        if not self.active:
            return
        self.adapter.uninstall()
        del _WRAPPED[self.model]

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        names = ", ".join(m.name for m in self.methods)
        return f"Handle({type(self.model).__name__}, [{names}], {state})"


def wrap(model: nn.Module, methods: MethodSpec | Sequence[MethodSpec], /, **overrides: Any) -> Handle:
    """Insert vtc methods into a loaded model, in place.

    Stock ``model(...)`` and ``model.generate(...)`` then run with the methods active, for any batch size.

    Args:
        model: a supported ``*ForConditionalGeneration`` model (see ``vtc.list_adapters()``).
        methods: a method spec (``"dart"``, ``"dart.r128"``, a ``MethodConfig``) or a list of them.
        **overrides: settings of a single method, e.g. ``keep=64``.

    Returns:
        A ``Handle``; ``handle.remove()`` restores the model exactly.

    Raises:
        UnsupportedModelError: the model family has no adapter.
        UnknownMethodError: a method or preset name is not registered.
        ValueError: a setting is out of range for the method or this model.
        AlreadyWrappedError: vtc already wraps this model.
        UnsupportedTransformersError: the installed transformers moved an internal vtc relies on.
    """
    configs = as_config_list(methods, **overrides)
    if model in _WRAPPED:
        raise AlreadyWrappedError(
            f"this model is already wrapped ({_WRAPPED[model]!r}); call handle.remove() first, or pass all "
            f"methods to one vtc.wrap call."
        )
    adapter = adapter_for(model)
    # Before any hook goes in: an unrecognised transformers raises here, not deep inside a forward.
    surface.check(adapter.text_model, adapter.layers)
    bound = []
    for config in configs:
        method = get_method(config.method)(config)
        method.bind(adapter)
        bound.append(method)
    pipeline = Pipeline(bound, adapter.num_layers)
    try:
        adapter.install(pipeline)
    except BaseException:
        adapter.uninstall()
        raise
    handle = Handle(model, adapter, bound)
    _WRAPPED[model] = handle
    return handle


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
