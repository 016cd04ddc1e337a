"""Progress bars with an ETA for long work (eval, benchmarks, the demo, training), silenced by ``--quiet``.

tqdm comes with transformers (through huggingface_hub), so it is used when present; without it, or
when disabled, a bar does nothing.
"""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(total: int, desc: str, *, unit: str = "it", enabled: bool = True, initial: int = 0) -> Any:
    """A progress bar on stderr showing done/total, rate and ETA; a context manager with ``update(n)``."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def eta(elapsed: float, done: int, total: int) -> str:
    """``m:ss`` left at the rate so far (``?`` before anything is done)."""
    if done <= 0:
        return "?"
    left = max(0.0, elapsed / done * (total - done))
    return f"{int(left // 60)}:{int(left % 60):02d}"
