"""Argument checks shared by an op's reference and its Triton implementation.

Both backends call the same check, so a bad call raises the same ``ValueError`` whichever runs (the
dispatcher also calls it before asking a Triton implementation whether it supports the call).
"""

from __future__ import annotations

import torch


def fail(op: str, message: str) -> None:
    """Raise the ``ValueError`` every check raises: ``"<op>: <message>"``."""
    raise ValueError(f"{op}: {message}")


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor | None,
    shape: tuple[int | None, ...],
    kind: str,
    *,
    optional: bool = False,
) -> None:
    """Raise unless `t` has `shape` (None = any size) and dtype `kind` (``"bool" | "int" | "float" | "real"``)."""
    if t is None:
        if not optional:
            fail(op, f"{name} is required.")
        return
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a tensor; got {type(t).__name__}.")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        fail(op, f"{name} must have shape {want}; got {list(t.shape)}.")
    ok = {
        "bool": t.dtype == torch.bool,
        "int": not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
        "float": t.is_floating_point(),
        "real": not t.is_complex() and t.dtype != torch.bool,
    }[kind]
    if not ok:
        fail(op, f"{name} must be a {kind} tensor; got {t.dtype}.")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise unless every given tensor is on one device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        fail(op, f"all tensors must be on one device; got {where}.")
