"""Adapter for Qwen2.5-VL: Qwen2-VL's layout with a windowed, gated-MLP vision tower."""

from __future__ import annotations

from typing import Any

from vtc.adapters.qwen2_vl import Qwen2VLAdapter
from vtc.adapters.registry import register_adapter
from vtc.flops import VisionDims


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801  (the family's own spelling)
    """Qwen2.5-VL checkpoints in transformers' native format."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"

    def _vision_dims(self) -> VisionDims:
        v = self.model.config.vision_config
        return VisionDims(
            num_layers=v.depth,
            hidden=v.hidden_size,
            ffn=v.intermediate_size,
            ffn_matrices=3,
            patches_per_token=v.spatial_merge_size**2,
            projector_macs_per_token=self._linear_macs(self.projector),
            patch_embed_macs=self._patch_embed_macs(),
            # Blocks outside fullatt_block_indexes attend within windows of window_size pixels.
            window=(v.window_size // v.patch_size) ** 2,
            full_attention_layers=len(v.fullatt_block_indexes),
        )

    @classmethod
    def _tiny_vision_config(cls) -> dict[str, Any]:
        return dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
            patch_size=cls.PATCH, temporal_patch_size=cls.TEMPORAL, spatial_merge_size=2,
            window_size=32, fullatt_block_indexes=[1],
        )  # fmt: skip

    @classmethod
    def _tiny_config(cls, num_layers: int, **kw: Any):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(**cls._tiny_config_kwargs(num_layers, **kw))

    @classmethod
    def _model_cls(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration
