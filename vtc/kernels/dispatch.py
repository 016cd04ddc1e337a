"""Backend choice for vtc's kernels.

Every op has a torch reference (the definition of correct) and may have faster implementations; the
ops and their implementations are entries of ``KERNELS``, the generic registry every vtc plugin point
uses, so an unknown op name gets the same did-you-mean error as an unknown method. The backend is
chosen, in this order, by an explicit ``backend=`` argument, then ``vtc.kernels.use(...)``, then the
``VTC_KERNEL_BACKEND`` environment variable (``auto|torch|triton``, read at every call), then ``auto``.

Auto picks Triton for CUDA tensors when triton imports and the kernel supports the call, and otherwise
falls back to the reference without a word: a user who asked for nothing gets a working model. An
explicit request for an implementation that cannot run raises, because silently running something
else would make a benchmark or a bug report lie. ``record()`` collects which backend ran each op, so
``handle.stats`` can report it.

Triton is imported lazily: only when a call's tensors could run a Triton kernel (CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), so ``import vtc`` never pays for it or depends on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from vtc.registry import Registry

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "VTC_KERNEL_BACKEND"
INTERPRET_VAR = "TRITON_INTERPRET"


@dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    Attributes:
        fn: the function, called with the op's arguments.
        supports: ``supports(*args, **kwargs) -> str | None``: None when it can run the call, else the reason.
        preferred: ``preferred(*args, **kwargs) -> bool``: whether auto may pick it for the call. Checked
            before ``supports`` so that auto never imports triton for CPU tensors.
    """

    fn: Callable[..., Any]
    supports: Callable[..., str | None]
    preferred: Callable[..., bool]


#: op name -> {backend: implementation}. Unknown names raise ``LookupError`` with a did-you-mean.
KERNELS: Registry[dict[str, Impl]] = Registry("kernel op", LookupError)
_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("vtc_kernel_backend", default=None)
_recorder: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("vtc_kernel_record", default=None)


def _always(*_: Any, **__: Any) -> str | None:
    return None


def _yes(*_: Any, **__: Any) -> bool:
    return True


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    supports: Callable[..., str | None] = _always,
    preferred: Callable[..., bool] = _yes,
) -> None:
    """Register `fn` as the `backend` implementation of `op` (the first registration creates the op).

    Raises:
        ValueError: `backend` is not a concrete backend (``auto`` is a choice, not an implementation),
            or the first implementation of a new op is not its torch reference, which ``auto`` falls back to.
    """
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}; got {backend!r}.")
    if op not in KERNELS:
        if backend != "torch":
            raise ValueError(f"register the torch reference of kernel op {op!r} before its {backend} implementation.")
        KERNELS.register(op, {})
    KERNELS.get(op)[backend] = Impl(fn, supports, preferred)


def registered() -> dict[str, tuple[str, ...]]:
    """``{op: backends}`` of every registered op, sorted: what ``vtc.kernels`` can run."""
    return {op: tuple(sorted(KERNELS.get(op))) for op in KERNELS.names()}


def _check(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    return backend


class use(contextlib.AbstractContextManager):  # noqa: N801  (reads as a function: vtc.kernels.use("torch"))
    """Choose the kernel backend: from now on in this thread, or within a ``with`` block.

    The choice is a context variable, so a ``with`` block in one thread or asyncio task cannot change
    the kernels another one runs. The price: a thread started later does not see a plain call's choice
    (asyncio tasks created later do); set ``VTC_KERNEL_BACKEND`` to choose for every thread.

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
    """Run `op` on the chosen backend and record which one ran.

    Raises:
        LookupError: `op` is not registered.
        ValueError: an unknown backend name (argument, ``use()`` or ``VTC_KERNEL_BACKEND``).
        RuntimeError: an explicit backend that has no implementation of `op` or cannot run this call.
    """
    impls = KERNELS.get(op)
    want = requested(backend)
    if want == "auto":
        name = "torch"
        for candidate in ("triton",):
            impl = impls.get(candidate)
            if impl is not None and impl.preferred(*args, **kwargs) and impl.supports(*args, **kwargs) is None:
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


# -- Triton: lazy loading and the checks every Triton implementation shares ---------------------------


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get(INTERPRET_VAR, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def on_cuda(*args: Any, **kwargs: Any) -> bool:
    """Auto's rule for Triton: every tensor argument is on a CUDA device and no interpreter is asked for.

    CPU tensors run Triton only in the interpreter, which is for tests: orders of magnitude slower than
    the reference, so auto never picks it.
    """
    tensors = _tensors(args, kwargs)
    return bool(tensors) and all(t.is_cuda for t in tensors) and not interpreting()


def _load(module: str) -> ModuleType:
    """Import a Triton implementation module; it records whether its kernels were defined interpreted."""
    return importlib.import_module(module)


def triton_problem(module: str, *args: Any, **kwargs: Any) -> str | None:
    """Why the Triton implementation in `module` cannot run on these arguments' devices, or None.

    Imports triton (through `module`) only when the tensors could run a kernel, so a CPU-only caller
    never imports it. A Triton kernel is compiled for the GPU or for the interpreter when its module is
    first imported (``TRITON_INTERPRET`` is read by the ``@triton.jit`` decorator), so the mode of an
    already imported module must match the call's device.
    """
    tensors = _tensors(args, kwargs)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"its tensors are on different devices ({', '.join(sorted(map(str, devices)))})"
    kinds = {d.type for d in devices}
    if kinds - {"cuda", "cpu"}:
        return f"Triton runs on CUDA tensors (or CPU tensors under {INTERPRET_VAR}=1); got {kinds.pop()} tensors"
    if "cpu" in kinds and not interpreting():
        return (
            f"the tensors are on the CPU, where Triton runs only in its interpreter: set {INTERPRET_VAR}=1 before "
            "vtc's Triton kernels are first imported (it is meant for tests; it is slow)"
        )
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'vtc-vlm[triton]')"
    try:
        mod = _load(module)
    except Exception as exc:  # a broken or too old triton: auto falls back, explicit requests report it
        return f"importing its Triton kernels failed ({type(exc).__name__}: {exc})"
    if "cpu" in kinds and not mod.INTERPRETED:
        return f"its kernels were compiled for the GPU in this process ({INTERPRET_VAR} was unset when they loaded)"
    return None


def lazy(module: str, name: str) -> Callable[..., Any]:
    """A function that imports ``module.name`` on its first call and forwards to it."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return getattr(_load(module), name)(*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__module__ = module  # where the implementation lives, for tracebacks and for docs/KERNELS.md's table
    run.__doc__ = f"Lazily imported ``{module}.{name}``."
    return run
