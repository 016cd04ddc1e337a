"""Stages and taps inside the vision tower (MustDrop's window merge and its CLS key set).

Tower stages hide tokens rather than remove them: a hidden token stops being a key for the later tower
layers through an additive mask, so the tower's output keeps its shape and the LLM sees every placeholder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vtc import surface
from vtc.method import AttentionCall, VisionContext
from vtc.state import VisualTokenState

if TYPE_CHECKING:
    from vtc.engine.dispatch import ModelSessions
    from vtc.engine.session import Session


def install(owner: ModelSessions) -> None:
    """Install the tower hooks the model's sessions need (none when no session acts in the tower)."""
    adapter = owner.adapter
    layers = adapter.vision_encoder_layers()
    if layers is None:
        return
    stage_layers = set().union(*(s.pipeline.vision_stage_layers for s in owner.sessions))
    tap_layers = set().union(*(s.pipeline.vision_tap_layers for s in owner.sessions))
    if not (stage_layers or tap_layers):
        return

    def start(module: nn.Module, args: tuple) -> None:
        if owner.active is not None:
            owner.active.tower_valid = None
            owner.active.pipeline.on_vision_start()

    owner._hooks.append(adapter.vision_tower.register_forward_pre_hook(start))
    for i in range(min(stage_layers, default=len(layers)), len(layers)):
        owner._hooks.append(layers[i].register_forward_pre_hook(_layer_hook(owner, i), with_kwargs=True))
    owner._route("vision", layers, tap_layers)


def _layer_hook(owner: ModelSessions, i: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        session = owner.active
        if session is None:
            return None
        return on_layer(session, i, args, kwargs)

    return hook


def on_layer(session: Session, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run the session's tower stages at tower layer `i`; mask the tokens they hide from later layers."""
    adapter = session.adapter
    hidden = args[0]
    if session.tower_valid is None:
        session.tower_valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    for method in session.pipeline.vision_stages_at(i):
        ctx = VisionContext(i, hidden, session.tower_valid, adapter.vision_grid, adapter.vision_has_cls)
        sel = method.vision_select(ctx)
        if sel is None:
            continue
        if sel.hidden is not None:
            hidden = sel.hidden
        keep = sel.keep.clone()
        if adapter.vision_has_cls:
            keep[:, 0] = True  # the CLS token is never dropped
        session.tower_valid = session.tower_valid & keep
    if bool(session.tower_valid.all()):
        return (hidden, *args[1:]), kwargs
    # Hidden tokens stop being keys: an additive mask on every later tower layer.
    floor = torch.finfo(hidden.dtype).min
    mask = torch.zeros(hidden.shape[0], 1, 1, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill(~session.tower_valid[:, None, None, :], floor)  # [N, 1, 1, T]
    given = args[1] if len(args) > 1 else kwargs.get(surface.ATTENTION_MASK)
    mask = mask if given is None else given + mask
    if len(args) > 1:
        return (hidden, mask, *args[2:]), kwargs
    return (hidden,), {**kwargs, surface.ATTENTION_MASK: mask}


def on_attention(session: Session, call: AttentionCall) -> None:
    """Hand a tapped tower attention call to the session's methods, with the tokens still taking part."""
    n, t = call.query.shape[0], call.query.shape[2]
    valid = session.tower_valid if session.tower_valid is not None else torch.ones(n, t, dtype=torch.bool)
    patches = torch.ones(n, t, dtype=torch.bool, device=valid.device)
    if session.adapter.vision_has_cls:
        patches[:, 0] = False
    state = VisualTokenState.initial(patches, valid.to(patches.device))
    session.pipeline.on_vision_attention(dataclasses.replace(call, state=state))
