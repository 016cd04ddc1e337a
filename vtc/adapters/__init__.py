"""Model-family adapters. One file per family; each registers itself on import."""

from vtc.adapters import (  # noqa: F401  (registration)
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    qwen2_5_vl,
    qwen2_vl,
)
from vtc.adapters.base import Adapter
from vtc.adapters.registry import ADAPTERS, adapter_class_for, adapter_for, supported_model_types

__all__ = ["ADAPTERS", "Adapter", "adapter_class_for", "adapter_for", "supported_model_types"]
