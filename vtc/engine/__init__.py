"""vtc's engine: sessions, forward kinds, compaction, cache records and views (ARCHITECTURE.md section 9).

Family adapters (``vtc.adapters``) are stateless and describe a model; everything that runs during a
forward lives here.
"""

from vtc.engine.cache import CacheView, MixedKV, QuantizedKV, dequantize, kv_nbytes, quantize
from vtc.engine.dispatch import ModelSessions
from vtc.engine.record import CacheRecord, Chunk, ForwardKind, Segment
from vtc.engine.session import Session

__all__ = [
    "CacheRecord",
    "CacheView",
    "Chunk",
    "ForwardKind",
    "MixedKV",
    "ModelSessions",
    "QuantizedKV",
    "Segment",
    "Session",
    "dequantize",
    "kv_nbytes",
    "quantize",
]
