"""Method settings: frozen dataclasses with validation, named presets and a JSON round trip.

Every method has one ``MethodConfig`` subclass holding the paper's defaults. ``resolve`` turns what a
user writes ("dart", "dart.r128", a config object, or a dict read back from JSON) into a config, so an
evaluation result can record exactly what ran and rebuild it later.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from vtc.errors import UnknownMethodError
from vtc.registry import suggest

C = TypeVar("C", bound="MethodConfig")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's settings.

    Subclasses are ``@dataclass(frozen=True, kw_only=True)`` and validate in ``__post_init__`` (calling
    ``super().__post_init__()`` first), raising ``ValueError`` with a sentence that names the valid range.
    """

    #: The registered method name; set by ``vtc.method.register_method``.
    method: ClassVar[str] = ""
    #: Groups of fields that are alternatives to each other: ``replace`` setting one clears the others.
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __post_init__(self) -> None:
        # Lists (from JSON or a user) become tuples, so configs stay immutable and hashable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    def replace(self: C, **changes: Any) -> C:
        """Return a copy with `changes` applied; setting one field of an exclusive group clears the rest."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            hint = suggest(unknown[0], sorted(names))
            raise ValueError(
                f"{self.method or type(self).__name__} has no setting {unknown[0]!r}.{hint} "
                f"Its settings are: {', '.join(sorted(names))}."
            )
        for group in self.exclusive:
            chosen = [k for k in group if k in changes and changes[k] is not None]
            if len(chosen) > 1:
                raise ValueError(f"{self.method}: set only one of {', '.join(group)}; got {', '.join(chosen)}.")
            if chosen:
                changes = {**{k: None for k in group}, **changes}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that ``MethodConfig.from_dict`` turns back into an equal config."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> MethodConfig:
        """Rebuild a config from ``to_dict`` output; the ``method`` key selects the class."""
        if "method" not in data:
            raise ValueError("a method config dict needs a 'method' key naming the method, e.g. {'method': 'dart'}.")
        from vtc.method import get_method

        cls = get_method(data["method"]).config_cls
        return cls(**{k: v for k, v in data.items() if k != "method"})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @staticmethod
    def load(path: str | Path) -> MethodConfig:
        return MethodConfig.from_dict(json.loads(Path(path).read_text()))


MethodSpec = str | MethodConfig | Mapping[str, Any]


def resolve(spec: MethodSpec, **overrides: Any) -> MethodConfig:
    """Turn a method spec into a config.

    Args:
        spec: ``"name"`` (the method's defaults), ``"name.preset"``, a ``MethodConfig``, or a dict from
            ``to_dict``.
        **overrides: settings that replace the spec's (see ``MethodConfig.replace``).

    Raises:
        UnknownMethodError: the method or preset is not registered.
        ValueError: a setting is unknown or out of range.
    """
    if isinstance(spec, MethodConfig):
        config = spec
    elif isinstance(spec, Mapping):
        config = MethodConfig.from_dict(spec)
    elif isinstance(spec, str):
        from vtc.method import get_method

        name, _, preset = spec.partition(".")
        method_cls = get_method(name)
        if preset:
            presets = method_cls.presets
            if preset not in presets:
                options = sorted(presets)
                raise UnknownMethodError(
                    f"unknown preset {spec!r}.{suggest(preset, options)} "
                    f"Presets of {name!r}: {', '.join(f'{name}.{p}' for p in options)}."
                )
            config = method_cls.config_cls(**presets[preset])
        else:
            config = method_cls.config_cls()
    else:
        raise TypeError(
            f"a method is given as a name like 'dart.r128', a MethodConfig or a dict; got {type(spec).__name__}."
        )
    return config.replace(**overrides) if overrides else config


def check_int(method: str, name: str, value: Any, lo: int, hi: int | None = None, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless `value` is an int in [lo, hi] (or None when `optional`)."""
    if value is None and optional:
        return
    bad_type = not isinstance(value, int) or isinstance(value, bool)
    if bad_type or value < lo or (hi is not None and value > hi):
        upper = f" and at most {hi}" if hi is not None else ""
        raise ValueError(f"{method}: {name} must be an integer of at least {lo}{upper}; got {value!r}.")


def check_fraction(method: str, name: str, value: Any, *, optional: bool = False, closed_low: bool = False) -> None:
    """Raise ``ValueError`` unless `value` is a float in (0, 1] (or [0, 1] when `closed_low`)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 <= value <= 1 if closed_low else 0 < value <= 1)
    if not ok:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        raise ValueError(f"{method}: {name} must be a number in {interval}; got {value!r}.")


def check_layers(method: str, layers: Any, name: str = "layers") -> None:
    """Raise ``ValueError`` unless `layers` is None or a sequence of integer layer indices (negative from the end)."""
    if layers is None:
        return
    for layer in layers:
        check_int(method, f"{name} entries", layer, -10_000)
