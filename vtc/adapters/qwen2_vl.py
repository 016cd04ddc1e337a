"""Adapter for Qwen2-VL (``Qwen2VLForConditionalGeneration``): dynamic-resolution ViT, M-RoPE LM.

Visual tokens are images and videos alike. Positions are M-RoPE (temporal, height, width rows, plus a
text row in generate's 4-row form); the base adapter keeps them exact by gathering the rotary
embeddings at each kept token's original input position, so ``rope_deltas`` stay valid as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtc import surface
from vtc.adapters.base import Adapter
from vtc.adapters.registry import register_adapter
from vtc.flops import ModelDims, VisionDims
from vtc.state import TokenKind, VisualLayout


@register_adapter
class Qwen2VLAdapter(Adapter):
    """Qwen2-VL checkpoints in transformers' native format."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    modalities = frozenset({"image", "video"})
    mrope = True

    model_class = "Qwen2VLForConditionalGeneration"

    def _vision_parts(self, vlm: nn.Module) -> tuple[nn.Module, nn.Module]:
        return vlm.visual, vlm.visual.merger

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def _vision_dims(self) -> VisionDims:
        v = self.model.config.vision_config
        return VisionDims(
            num_layers=v.depth,
            hidden=v.embed_dim,
            ffn=int(v.embed_dim * v.mlp_ratio),
            ffn_matrices=2,
            patches_per_token=v.spatial_merge_size**2,
            projector_macs_per_token=self._linear_macs(self.projector),
            patch_embed_macs=self._patch_embed_macs(),
        )

    def _patch_embed_macs(self) -> int:
        v = self.model.config.vision_config
        return v.in_channels * v.temporal_patch_size * v.patch_size**2 * self.vision_tower.patch_embed.embed_dim

    def dims(self) -> ModelDims:
        return self._text_dims(self._vision_dims())

    def layout(self, visual: torch.Tensor, kwargs: dict) -> VisualLayout | None:
        """Images and videos from their ``*_grid_thw``: each item's tokens in raster order over (t, h, w)
        after the spatial merge; each LLM token stands for the ``merge**2`` consecutive tower patches of
        its merge window."""
        if not bool(visual.any()):
            return None
        ids = kwargs.get("input_ids")
        types = kwargs.get("mm_token_type_ids")
        if ids is not None:
            kinds = {0: ids == self.model.config.image_token_id, 1: ids == self.model.config.video_token_id}
        elif types is not None:
            kinds = {0: types == 1, 1: types == 2}
        else:
            return None
        merge = self.model.config.vision_config.spatial_merge_size
        layout = VisualLayout.empty(*visual.shape, merge * merge, visual.device)
        positions = kwargs.get(surface.POSITION_IDS)
        for modality, grid_name in enumerate(("image_grid_thw", "video_grid_thw")):
            grids = kwargs.get(grid_name)
            if grids is None and positions is not None and positions.dim() == 3:
                # generate may pass encoded features instead of grids; M-RoPE positions carry the grid too
                self._fill_from_positions(layout, kinds[modality], positions[-3:], modality, merge)
            else:
                self._fill(layout, kinds[modality], grids, modality, merge, grid_name)
        # One key per item across both modalities (item numbers restart for videos).
        self._check_contiguous(layout.field("item") * 2 + layout.field("modality"), visual, "item")
        return layout

    @staticmethod
    def _fill_from_positions(
        layout: VisualLayout, mask: torch.Tensor, rope: torch.Tensor, modality: int, merge: int
    ) -> None:
        """Assign items from M-RoPE rows ``[3, B, L]``: each contiguous placeholder run is one item, and
        (t, h, w) relative to its first token give frame (by rank: video times may skip), row and column."""
        item = 0
        for b in range(mask.shape[0]):
            pos = mask[b].nonzero().flatten()
            if not len(pos):
                continue
            breaks = (pos.diff() != 1).nonzero().flatten() + 1
            for media, at in enumerate(torch.tensor_split(pos, breaks.tolist())):
                t, h, w = (r[b, at] - r[b, at[0]] for r in rope)
                frame = torch.unique(t, return_inverse=True)[1]
                cols, per_frame = int(w.max()) + 1, int((h.max() + 1) * (w.max() + 1))
                j = frame * per_frame + h * cols + w  # raster index in the item
                for field, value in (
                    ("item", item), ("media", media), ("modality", modality), ("frame", frame),
                    ("row", h), ("col", w), ("kind", int(TokenKind.PATCH)),
                ):  # fmt: skip
                    layout.field(field)[b, at] = value
                layout.tower[b, at] = j[:, None] * merge * merge + torch.arange(merge * merge, device=pos.device)
                item += 1

    @staticmethod
    def _fill(layout: VisualLayout, mask: torch.Tensor, grids: Any, modality: int, merge: int, name: str) -> None:
        """Assign this modality's items (rows in order, grids in order) to its placeholder tokens."""
        total = int(mask.sum())
        sizes = [] if grids is None else [int(t * h * w) // merge**2 for t, h, w in grids.tolist()]
        if total != sum(sizes):
            raise ValueError(
                f"the input has {total} {'video' if modality else 'image'} placeholders but {name} describes "
                f"{sum(sizes)} tokens ({len(sizes)} items); pass the ids and grids the processor made together."
            )
        item, media_in_row = 0, [0] * mask.shape[0]
        for b in range(mask.shape[0]):
            pos = mask[b].nonzero().flatten()
            start = 0
            while start < len(pos):
                n = sizes[item]
                _, h, w = (int(x) for x in grids[item].tolist())
                cols, per_frame = w // merge, (h // merge) * (w // merge)
                j = torch.arange(n, device=pos.device)
                at = pos[start : start + n]
                for field, value in (
                    ("item", item), ("media", media_in_row[b]), ("modality", modality), ("frame", j // per_frame),
                    ("row", (j % per_frame) // cols), ("col", j % cols), ("kind", int(TokenKind.PATCH)),
                ):  # fmt: skip
                    layout.field(field)[b, at] = value
                layout.tower[b, at] = j[:, None] * merge * merge + torch.arange(merge * merge, device=pos.device)
                item, start = item + 1, start + n
                media_in_row[b] += 1

    def prompt_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """M-RoPE position ids ``[3, B, L]`` of a whole prompt (images and videos by their grids)."""
        ids = inputs["input_ids"]
        types = inputs.get("mm_token_type_ids")
        if types is None:
            config = self.model.config
            types = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
        grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
        return surface.mrope_positions(self.vlm, ids, types, attention_mask=inputs.get("attention_mask"), **grids)

    def text_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": torch.zeros_like(input_ids)}

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """M-RoPE embeddings; 1-D positions (a renumbered sequence) number all three rows alike."""
        if positions.dim() == 2:
            positions = positions[None].expand(3, *positions.shape)  # [B, L] -> [3, B, L]
        elif positions.shape[0] == 4:  # generate's form: a text row, then temporal / height / width
            positions = positions[1:]
        return surface.rotary(self.text_model, hidden, positions)

    # -- tiny models ------------------------------------------------------------------------------
    GRID, PATCH, TEMPORAL = 32, 8, 2  # 32 x 32 patches, merged 2 x 2: 256 visual tokens per image
    VIDEO_GRID = 16  # 16 x 16 patches per frame: 64 visual tokens per temporal patch (2 frames)
    IMAGE_TOKEN, VIDEO_TOKEN, START, END = 120, 121, 122, 123

    @classmethod
    def _tiny_vision_config(cls) -> dict[str, Any]:
        return dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
            patch_size=cls.PATCH, temporal_patch_size=cls.TEMPORAL, spatial_merge_size=2,
        )  # fmt: skip

    @classmethod
    def _tiny_config(cls, num_layers: int, **kw: Any):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(**cls._tiny_config_kwargs(num_layers, **kw))

    @classmethod
    def _tiny_config_kwargs(cls, num_layers: int, **kw: Any) -> dict[str, Any]:
        text = dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1, **kw,
        )  # fmt: skip
        return dict(
            vision_config=cls._tiny_vision_config(), text_config=text,
            image_token_id=cls.IMAGE_TOKEN, video_token_id=cls.VIDEO_TOKEN,
            vision_start_token_id=cls.START, vision_end_token_id=cls.END,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip

    @classmethod
    def _model_cls(cls):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def tiny_model(
        cls, *, seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa", dtype=torch.float32, **kw: Any
    ) -> nn.Module:
        config = cls._tiny_config(num_layers, **kw)
        torch.manual_seed(seed)
        model = cls._model_cls()._from_config(config, attn_implementation=attn_implementation)
        return model.to(dtype).eval()

    @classmethod
    def make_samples(
        cls,
        model: nn.Module,
        *,
        batch: int = 2,
        seed: int = 0,
        images: list[int] | None = None,
        frames: list[int] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Rows of images (a 32 x 32 patch grid each) and videos (a 16 x 16 grid per frame; ``frames[i]``
        frames, rounded up to whole temporal patches as the processor pads a clip)."""
        images = cls._check_sample_media(images, frames, batch)
        frames = frames or [0] * len(images)
        g = torch.Generator().manual_seed(seed)
        patch_dim = 3 * cls.TEMPORAL * cls.PATCH * cls.PATCH
        dtype = next(model.parameters()).dtype
        samples = []
        for i, (n_img, n_frames) in enumerate(zip(images, frames, strict=True)):
            ids = torch.randint(3, 100, (2 + i,), generator=g).tolist()
            for _ in range(n_img):
                ids += [cls.START] + [cls.IMAGE_TOKEN] * (cls.GRID * cls.GRID // 4) + [cls.END]
            steps = -(-n_frames // cls.TEMPORAL)  # temporal patches
            if steps:
                ids += [cls.START] + [cls.VIDEO_TOKEN] * (steps * cls.VIDEO_GRID * cls.VIDEO_GRID // 4) + [cls.END]
            ids += torch.randint(3, 100, (3 + 2 * i,), generator=g).tolist()
            input_ids = torch.tensor([ids])
            sample = {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == cls.IMAGE_TOKEN).long() + 2 * (input_ids == cls.VIDEO_TOKEN).long(),
            }
            if n_img:
                sample["pixel_values"] = torch.randn(n_img * cls.GRID**2, patch_dim, generator=g).to(dtype)
                sample["image_grid_thw"] = torch.tensor([[1, cls.GRID, cls.GRID]] * n_img)
            if steps:
                sample["pixel_values_videos"] = torch.randn(steps * cls.VIDEO_GRID**2, patch_dim, generator=g).to(dtype)
                sample["video_grid_thw"] = torch.tensor([[steps, cls.VIDEO_GRID, cls.VIDEO_GRID]])
            samples.append(sample)
        return samples

    @classmethod
    def collate(cls, model: nn.Module, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = model.config.text_config.pad_token_id
        width = max(s["input_ids"].shape[1] for s in samples)
        out = {
            "input_ids": torch.full((len(samples), width), pad, dtype=torch.long),
            "attention_mask": torch.zeros(len(samples), width, dtype=torch.long),
            "mm_token_type_ids": torch.zeros(len(samples), width, dtype=torch.long),
        }
        for i, s in enumerate(samples):
            n = s["input_ids"].shape[1]
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                out[key][i, width - n :] = s[key][0]
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [s[key] for s in samples if key in s]
            if parts:
                out[key] = torch.cat(parts)
        return out
