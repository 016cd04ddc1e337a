"""The built-in methods. One file per method; each registers itself on import."""

from vtc.methods import (  # noqa: F401  (registration)
    dart,
    deco,
    dropout_decoding,
    focusllava,
    gemfilter,
    mustdrop,
    random,
    sparsevlm,
    specdec,
    var,
    videoscan,
    zipvl,
)
from vtc.methods.dart import DART, DARTConfig
from vtc.methods.deco import DeCo, DeCoConfig
from vtc.methods.dropout_decoding import DropoutDecoding, DropoutDecodingConfig
from vtc.methods.focusllava import FocusLLaVA, FocusLLaVAConfig
from vtc.methods.gemfilter import GemFilter, GemFilterConfig
from vtc.methods.mustdrop import MustDrop, MustDropConfig
from vtc.methods.random import Random, RandomConfig
from vtc.methods.sparsevlm import SparseVLM, SparseVLMConfig
from vtc.methods.var import VAR, VARConfig
from vtc.methods.videoscan import VideoScan, VideoScanConfig
from vtc.methods.zipvl import ZipVL, ZipVLConfig

__all__ = [
    "DART",
    "VAR",
    "DARTConfig",
    "DeCo",
    "DeCoConfig",
    "DropoutDecoding",
    "DropoutDecodingConfig",
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
    "VARConfig",
    "VideoScan",
    "VideoScanConfig",
    "ZipVL",
    "ZipVLConfig",
]
