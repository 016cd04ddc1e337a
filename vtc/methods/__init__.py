"""The built-in methods. One file per method; each registers itself on import."""

from vtc.methods import dart  # noqa: F401  (registration)
from vtc.methods.dart import DART, DARTConfig

__all__ = ["DART", "DARTConfig"]
