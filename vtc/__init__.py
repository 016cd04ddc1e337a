"""vtc: visual-token compression and decoding methods for Hugging Face vision-language models.

Wrap a loaded model with one call; stock ``forward`` and ``generate`` then run with the methods::

    import vtc
    handle = vtc.wrap(model, "dart", keep=64)
    model.generate(**inputs)
    print(handle.stats)
    handle.remove()

Importing vtc patches nothing and imports no triton.
"""

from vtc import flops
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
from vtc.flops import FlopsReport, ModelDims
from vtc.measure import FlopsModule
from vtc.stream import VideoStream, stream

# ``vtc.flops`` is the module (``vtc.flops.ModelDims``, ``import vtc.flops``) and also the FLOPs function
# (``vtc.flops("llava-1.5-7b", "dart.r128")``): the module gets a callable class here, in the API layer,
# because the function resolves specs and adapters, which the core module must not import.
flops.__class__ = FlopsModule

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
    "VideoStream",
    "apply",
    "flops",
    "list_adapters",
    "list_methods",
    "resolve",
    "stream",
    "wrap",
]
