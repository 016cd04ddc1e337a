"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP anyres tiles capped at
``anyres_max_N``, bilinearly pooled video frames, Qwen2 LM.

Images pack as in LLaVA-NeXT (``vtc.adapters.llava_next``) with two differences: an unpadded tile grid
larger than N tiles is resized bilinearly to about N tiles' area, and an image in a row of several takes
its base view alone (``batch_num_images``). A video runs one tower pass per frame; each frame's grid is
resized bilinearly to half its side (rounded up), and one newline token ends the video.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from vtc.adapters import anyres
from vtc.adapters.llava_next import LlavaNextAdapter
from vtc.adapters.registry import register_adapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision checkpoints in transformers' native format.

    Conventions beyond LLaVA-NeXT's (see its docstring):

    - A resized tile grid (``anyres_max_N``): each packed cell takes the tile of its *nearest* source patch
      (crop, in raster order over the tile grid) and its row / column count from the first packed cell of
      that tile's band, so each (media, frame, crop) group of patches stays a full rectangle; ``tower``
      lists the up to 2 x 2 source patches the bilinear resize reads for it.
    - An image in a row of several (``batch_num_images``): the base view's grid (crop -1) and one newline
      (row = the grid's last row).
    - Videos: frame-major pooled grids (crop -1, row / col in the pooled grid); ``tower`` lists the source
      patches the bilinear pooling reads, in the video's tower sequence (frames x patches). The video's
      one trailing newline has kind NEWLINE, frame = the last frame, row / col -1.
    """

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    equal_frames = True
    modalities: ClassVar[frozenset[str]] = frozenset({"image", "video"})

    model_class = "LlavaOnevisionForConditionalGeneration"

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def _tile_limit(self) -> int | None:
        return anyres.max_tiles(self.model.config.vision_aspect_ratio)

    @property
    def _pooled(self) -> int:
        return math.ceil(self.vision_grid / 2)

    def _image_plans(self, kwargs: dict, sizes: torch.Tensor) -> list[anyres.ImagePlan]:
        per_row = kwargs.get("batch_num_images")
        if per_row is None:  # the model then tiles every image
            return super()._image_plans(kwargs, sizes)
        alone = [n == 1 for n in torch.as_tensor(per_row).tolist() for _ in range(n)]
        if len(alone) != len(sizes):
            raise ValueError(
                f"batch_num_images counts {len(alone)} images but image_sizes has {len(sizes)}; pass both from "
                f"one processor call."
            )
        pairs = zip(sizes.tolist(), alone, strict=True)
        return [self._plan(size) if one else anyres.ImagePlan(self.vision_grid) for size, one in pairs]

    def _video_items(self, kwargs: dict) -> list[anyres.ItemTokens] | None:
        pixels = kwargs.get("pixel_values_videos")
        if pixels is not None:
            frames = [pixels.shape[1]] * pixels.shape[0]
        else:
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
            if encoded is None:
                return None
            frames = [(f.shape[0] - 1) // self._pooled**2 for f in encoded.pooler_output]
        side, pooled = self.vision_grid, self._pooled
        return [
            anyres.video_tokens(f, side, pooled, self._per_view, self._first, bilinear=True, newline=True)
            for f in frames
        ]

    # -- tiny models ------------------------------------------------------------------------------
    MULTI_IMAGE_BASE_ONLY: ClassVar[bool] = True
    #: ``anyres_max_3``: the 2 x 2 tile grid of a square image (16 x 16 patches) is resized to 13 x 13.
    ASPECT = "anyres_max_3"
    SIZES: ClassVar[list[tuple[int, int]]] = [(64, 64), (40, 64), (90, 40), (32, 60)]

    @classmethod
    def _tiny_vision(cls) -> Any:
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(
            image_size=cls.TILE, patch_size=cls.PATCH, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, vision_use_head=False,  # as OneVision's checkpoints
        )  # fmt: skip

    @classmethod
    def _tiny_text(cls, num_layers: int, **kw: Any) -> Any:
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1, **kw,
        )  # fmt: skip

    @classmethod
    def _tiny_config(cls, num_layers: int, **kw: Any) -> Any:
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig(
            vision_config=cls._tiny_vision(), text_config=cls._tiny_text(num_layers, **kw),
            image_token_index=cls.IMAGE_TOKEN, video_token_index=cls.VIDEO_TOKEN,
            image_grid_pinpoints=cls.PINPOINTS, vision_aspect_ratio=cls.ASPECT,
            vision_feature_select_strategy="full", vision_feature_layer=-1,
        )  # fmt: skip

    @classmethod
    def _model_cls(cls) -> type[nn.Module]:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def _video_count(cls, model: nn.Module, frames: int) -> int:
        v = model.config.vision_config
        return frames * math.ceil(v.image_size // v.patch_size / 2) ** 2 + 1

    @classmethod
    def _add_image_extras(cls, sample: dict[str, torch.Tensor], n_images: int) -> None:
        sample["batch_num_images"] = torch.tensor([n_images])

    @classmethod
    def _collate_image_extras(cls, out: dict[str, torch.Tensor], samples: list[dict[str, torch.Tensor]]) -> None:
        out["batch_num_images"] = torch.cat([s.get("batch_num_images", torch.tensor([0])) for s in samples])
