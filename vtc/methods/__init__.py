"""The built-in methods. One file per method; each registers itself on import."""

from vtc.methods import dart, focusllava, gemfilter, mustdrop, random, sparsevlm  # noqa: F401  (registration)
from vtc.methods.dart import DART, DARTConfig
from vtc.methods.focusllava import FocusLLaVA, FocusLLaVAConfig
from vtc.methods.gemfilter import GemFilter, GemFilterConfig
from vtc.methods.mustdrop import MustDrop, MustDropConfig
from vtc.methods.random import Random, RandomConfig
from vtc.methods.sparsevlm import SparseVLM, SparseVLMConfig

__all__ = [
    "DART",
    "DARTConfig",
    "FocusLLaVA",
    "FocusLLaVAConfig",
    "GemFilter",
    "GemFilterConfig",
    "MustDrop",
    "MustDropConfig",
    "Random",
    "RandomConfig",
    "SparseVLM",
    "SparseVLMConfig",
]
