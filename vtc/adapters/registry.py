"""The adapter registry, keyed on ``config.model_type``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vtc.errors import UnsupportedModelError
from vtc.registry import Registry

if TYPE_CHECKING:
    from vtc.adapters.base import Adapter

ADAPTERS: Registry[type[Adapter]] = Registry("adapter", UnsupportedModelError)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class under its ``name``."""
    return ADAPTERS.register(cls.name, cls)


def supported_model_types() -> list[str]:
    import vtc.adapters  # noqa: F401  (registers the built-in adapters)

    return sorted(t for name in ADAPTERS for t in ADAPTERS.get(name).model_types)


def adapter_class_for(model: Any) -> type[Adapter]:
    """The adapter class serving `model`, by its ``config.model_type``."""
    import vtc.adapters  # noqa: F401

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name in ADAPTERS:
        cls = ADAPTERS.get(name)
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"vtc has no adapter for {type(model).__name__} (model_type={model_type!r}). "
        f"Supported model types: {', '.join(supported_model_types())}."
    )


def adapter_for(model: Any) -> Adapter:
    """A new adapter instance for `model`."""
    return adapter_class_for(model)(model)
