"""Adapter for LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's images, and videos
whose frames are pooled before the projector.

Images pack exactly as in LLaVA-NeXT (``vtc.adapters.llava_next``). A video runs one tower pass per frame;
the vision resampler pools each frame's ``side x side`` grid with a ``spatial_pool_stride`` window (average,
max or a strided convolution) before the projector; there is no newline token in a video.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from vtc.adapters import anyres
from vtc.adapters.llava_next import LlavaNextAdapter
from vtc.adapters.registry import register_adapter
from vtc.flops import VisionDims


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """LLaVA-NeXT-Video checkpoints in transformers' native format.

    Images follow LLaVA-NeXT's conventions. Videos: frame-major pooled grids (crop -1, row / col in the
    pooled grid); ``tower`` lists the ``stride x stride`` source patches of the pooling window in the
    video's tower sequence (frames x tokens per frame, CLS included per frame).
    """

    name = "llava_next_video"
    model_types = ("llava_next_video",)
    equal_frames = True
    modalities: ClassVar[frozenset[str]] = frozenset({"image", "video"})

    model_class = "LlavaNextVideoForConditionalGeneration"

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    @property
    def _pooled(self) -> int:
        return self.vision_grid // self.model.config.spatial_pool_stride

    def _video_items(self, kwargs: dict) -> list[anyres.ItemTokens] | None:
        pixels = kwargs.get("pixel_values_videos")
        if pixels is not None:
            frames = [pixels.shape[1]] * pixels.shape[0]
        else:
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
            if encoded is None:
                return None
            frames = [f.shape[0] // self._pooled**2 for f in encoded.pooler_output]
        side, pooled = self.vision_grid, self._pooled
        return [
            anyres.video_tokens(f, side, pooled, self._per_view, self._first, bilinear=False, newline=False)
            for f in frames
        ]

    def _pass_tokens(self, modality: int) -> int:
        return self._pooled**2 if modality else self.vision_grid**2

    def _vision_dims(self) -> VisionDims:
        c = self.model.config
        pool = 0
        if c.spatial_pool_mode == "conv":
            out_channels = getattr(c, "spatial_pool_out_channels", None) or c.vision_config.hidden_size
            pool = c.spatial_pool_stride**2 * c.vision_config.hidden_size * out_channels
        return dataclasses.replace(super()._vision_dims(), pool_macs_per_token=pool)

    # -- tiny models ------------------------------------------------------------------------------
    @classmethod
    def _tiny_config(cls, num_layers: int, **kw: Any) -> Any:
        from transformers import LlavaNextVideoConfig

        return LlavaNextVideoConfig(
            vision_config=cls._tiny_vision(), text_config=cls._tiny_text(num_layers, **kw),
            image_token_index=cls.IMAGE_TOKEN, video_token_index=cls.VIDEO_TOKEN,
            image_grid_pinpoints=cls.PINPOINTS, spatial_pool_mode="average", spatial_pool_stride=2,
            vision_feature_select_strategy="default", vision_feature_layer=-1,
        )  # fmt: skip

    @classmethod
    def _model_cls(cls) -> type[nn.Module]:
        from transformers import LlavaNextVideoForConditionalGeneration

        return LlavaNextVideoForConditionalGeneration

    @classmethod
    def _video_count(cls, model: nn.Module, frames: int) -> int:
        c = model.config
        return frames * (c.vision_config.image_size // c.vision_config.patch_size // c.spatial_pool_stride) ** 2
