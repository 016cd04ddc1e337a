"""vtc: visual-token compression and decoding methods for Hugging Face vision-language models.

Wrap a loaded model with one call; stock ``forward`` and ``generate`` then run with the methods::

    import vtc
    handle = vtc.wrap(model, "dart", keep=64)
    model.generate(**inputs)
    print(handle.stats)
    handle.remove()

Importing vtc patches nothing and imports no triton.
"""

from vtc.api import Handle, apply, list_adapters, list_methods, wrap
from vtc.config import MethodConfig, resolve
from vtc.errors import (
    MethodConflictError,
    MissingCapabilityError,
    UnknownMethodError,
    UnsupportedModelError,
    UnsupportedTransformersError,
    VTCError,
)
from vtc.flops import FlopsReport, ModelDims, flops

__version__ = "0.1.0"

__all__ = [
    "FlopsReport",
    "Handle",
    "MethodConfig",
    "MethodConflictError",
    "MissingCapabilityError",
    "ModelDims",
    "UnknownMethodError",
    "UnsupportedModelError",
    "UnsupportedTransformersError",
    "VTCError",
    "apply",
    "flops",
    "list_adapters",
    "list_methods",
    "resolve",
    "wrap",
]
