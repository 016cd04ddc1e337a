"""Backend choice for vtc's kernels.

Every op has a torch reference (the definition of correct) and may have faster implementations. The
backend is chosen, in this order, by an explicit ``backend=`` argument, then ``vtc.kernels.use(...)``,
then the ``VTC_KERNEL_BACKEND`` environment variable (``auto|torch|triton``), then ``auto``. Auto picks
the fastest implementation that supports the call and silently falls back to the reference; an
explicit request for an implementation that cannot run raises. ``record()`` collects which backend ran
each op, so ``handle.stats`` can report it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "VTC_KERNEL_BACKEND"


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    Attributes:
        fn: the function, called with the op's arguments.
        supports: ``supports(*args, **kwargs) -> str | None``: None when it can run the call, else the reason.
    """

    fn: Callable[..., Any]
    supports: Callable[..., str | None]


_IMPLS: dict[str, dict[str, Impl]] = {}
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("vtc_kernel_backend", default=None)
_recorder: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("vtc_kernel_record", default=None)


def _always(*_: Any, **__: Any) -> str | None:
    return None


def register(op: str, backend: str, fn: Callable[..., Any], supports: Callable[..., str | None] = _always) -> None:
    """Register `fn` as the `backend` implementation of `op`."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}; got {backend!r}.")
    _IMPLS.setdefault(op, {})[backend] = Impl(fn, supports)


def _check(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    return backend


class use(contextlib.AbstractContextManager):  # noqa: N801  (reads as a function: vtc.kernels.use("torch"))
    """Choose the kernel backend: for the rest of the program, or within a ``with`` block.

    Examples:
        ``vtc.kernels.use("torch")`` or ``with vtc.kernels.use("triton"): ...``
    """

    def __init__(self, backend: str) -> None:
        self._token = _chosen.set(_check(backend))

    def __exit__(self, *exc: object) -> None:
        _chosen.reset(self._token)


def requested(backend: str | None = None) -> str:
    """The backend asked for: the argument, else ``use()``, else the environment variable, else auto."""
    if backend is not None:
        return _check(backend)
    if (chosen := _chosen.get()) is not None:
        return chosen
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def call(op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
    """Run `op` on the chosen backend and record which one ran."""
    impls = _IMPLS[op]
    want = requested(backend)
    if want == "auto":
        name = "torch"
        for candidate in ("triton",):
            impl = impls.get(candidate)
            if impl is not None and impl.supports(*args, **kwargs) is None:
                name = candidate
                break
    else:
        impl = impls.get(want)
        if impl is None:
            raise RuntimeError(f"kernel {op!r} has no {want} implementation; use backend='torch' or 'auto'.")
        reason = impl.supports(*args, **kwargs)
        if reason is not None:
            raise RuntimeError(f"kernel {op!r} cannot run on the {want} backend: {reason}. Use 'torch' or 'auto'.")
        name = want
    if (rec := _recorder.get()) is not None:
        rec[op] = name
    return impls[name].fn(*args, **kwargs)


@contextlib.contextmanager
def record() -> Iterator[dict[str, str]]:
    """Collect ``{op: backend}`` for every op that runs inside the block."""
    rec: dict[str, str] = {}
    token = _recorder.set(rec)
    try:
        yield rec
    finally:
        _recorder.reset(token)
