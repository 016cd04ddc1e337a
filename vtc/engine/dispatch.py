"""Dispatch: the hooks on one model, shared by its sessions, calling the session active on it.

Two sessions (two pipelines on one model, or the same model as its own pruned draft) take turns inside
one decoding loop: ``Handle.activate`` switches which session the hooks call. The hooks, the attention
implementation switch and the ``generate`` override are (re)installed whenever a session comes or goes,
each only while some session needs it, so removing a session takes away exactly what only it needed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc import surface
from vtc.engine import attention, tower
from vtc.engine.record import record_of

if TYPE_CHECKING:
    from vtc.adapters.base import Adapter
    from vtc.engine.session import Session

_MODELS: weakref.WeakKeyDictionary[nn.Module, ModelSessions] = weakref.WeakKeyDictionary()
_ABSENT = object()


class ModelSessions:
    """The vtc sessions of one model, the hooks they share, and which session is active."""

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.sessions: list[Session] = []
        self.active: Session | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._attn_original: dict[str, str] = {}  # "text" / "vision" -> implementation before vtc
        self._generate: Any = None  # the instance's own `generate` attribute before vtc, if any

    @classmethod
    def of(cls, model: nn.Module, adapter: Adapter) -> ModelSessions:
        if model not in _MODELS:
            _MODELS[model] = cls(model, adapter)
        return _MODELS[model]

    @staticmethod
    def find(model: nn.Module) -> ModelSessions | None:
        return _MODELS.get(model)

    def add(self, session: Session) -> None:
        self.sessions.append(session)
        self.active = session
        try:
            self._install()
        except BaseException:
            self.remove(session)
            raise

    def remove(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.remove(session)
        if self.active is session:
            self.active = self.sessions[-1] if self.sessions else None
        self._install()
        if not self.sessions:
            _MODELS.pop(self.model, None)

    # -- hooks ------------------------------------------------------------------------------------------
    def _uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module in list(attention.ROUTES.keys()):
            if attention.ROUTES[module][0] is self:
                del attention.ROUTES[module]
        for part, original in self._attn_original.items():
            surface.set_attention_implementation(self._config(part), original)
        self._attn_original.clear()
        if self._generate is not None:
            if self._generate is _ABSENT:
                self.model.__dict__.pop("generate", None)
            else:
                self.model.generate = self._generate
            self._generate = None

    def _config(self, part: str) -> Any:
        return self.adapter.text_config if part == "text" else self.adapter.vision_tower.config

    def _install(self) -> None:
        """(Re)install the hooks the remaining sessions need, and only those."""
        self._uninstall()
        if not self.sessions:
            return
        a, model = self.adapter, self.model
        self._hooks.append(a.vlm.register_forward_pre_hook(self._dispatch("on_vlm"), with_kwargs=True))
        self._hooks.append(a.text_model.register_forward_pre_hook(self._on_text_start, with_kwargs=True))
        self._hooks.append(a.text_model.register_forward_hook(self._dispatch("on_text_end"), with_kwargs=True))
        # Every layer: any session may meet a cache another session (or a CacheView edit) pruned.
        for i in range(a.num_layers):
            self._hooks.append(a.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        if any(s.pipeline.output_methods for s in self.sessions):
            self._hooks.append(model.register_forward_hook(self._dispatch("on_output"), with_kwargs=True))
        self._route("text", a.layers, set().union(*(s.text_attention_layers for s in self.sessions)))
        tower.install(self)
        if any(s.pipeline.generator is not None for s in self.sessions):
            self._generate = model.__dict__.get("generate", _ABSENT)
            model.generate = self._generate_override(type(model).generate.__get__(model))

    def _route(self, part: str, layers: nn.ModuleList, indices: set[int]) -> None:
        """Switch `part` to vtc's attention function and route the `indices` layers' calls here."""
        if not indices:
            return
        config = self._config(part)
        original = surface.attention_implementation(config)
        editing = part == "text" and any(s.pipeline.edit_layers for s in self.sessions)
        if editing and original not in attention.EDITABLE_ATTENTION:
            raise ValueError(
                f"editing attention weights needs the model loaded with attn_implementation='sdpa' or "
                f"'eager'; this one uses {original!r}."
            )
        surface.set_attention_implementation(config, attention.register(original))
        self._attn_original[part] = original
        for i in indices:
            attention.ROUTES[self.adapter.attention_module(layers[i])] = (self, part, i)

    def _dispatch(self, name: str) -> Callable[..., Any]:
        def hook(*args: Any) -> Any:
            session = self.active
            return getattr(session, name)(*args) if session is not None else None

        return hook

    def _on_text_start(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.active is not None:
            return self.active.on_text_start(module, args, kwargs)
        if record_of(surface.get_cache(kwargs)) is not None:
            raise ValueError(
                "this KV cache was pruned by a vtc session, and no session is active on the model; activate "
                "one (handle.activate()) to continue it."
            )
        return None

    def _layer_hook(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            session = self.active
            return session.on_layer(i, args, kwargs) if session is not None else None

        return hook

    def _generate_override(self, stock: Callable[..., Any]) -> Callable[..., Any]:
        def generate(*args: Any, **kwargs: Any) -> Any:
            session = self.active
            if session is None or session.pipeline.generator is None:
                return stock(*args, **kwargs)
            return session.pipeline.generator.generate(session.bound, stock, *args, **kwargs)

        return generate
