"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama-style LM."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtc.adapters.base import Adapter
from vtc.adapters.registry import register_adapter
from vtc.flops import ModelDims, VisionDims
from vtc.state import TokenKind, VisualLayout


@register_adapter
class LlavaAdapter(Adapter):
    """LLaVA-1.5 and other single-resolution LLaVA checkpoints in transformers' native format."""

    name = "llava"
    model_types = ("llava",)
    capabilities = frozenset({"attn_tap", "final_norm", "vision_stage", "vision_cls_attn"})

    model_class = "LlavaForConditionalGeneration"

    def _vision_parts(self, vlm: nn.Module) -> tuple[nn.Module, nn.Module]:
        return vlm.vision_tower, vlm.multi_modal_projector

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    def vision_encoder_layers(self) -> nn.ModuleList:
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # transformers 5 flattens it
        return tower.encoder.layers

    @property
    def vision_grid(self) -> int:
        v = self.model.config.vision_config
        return v.image_size // v.patch_size

    @property
    def vision_has_cls(self) -> bool:
        return True

    def layout(self, visual: torch.Tensor, kwargs: dict) -> VisualLayout | None:
        """Images in order of appearance, each a g x g grid of patches in raster order.

        With the "full" feature strategy the tower's CLS token comes first (kind CLS, no grid cell).
        Each LLM token stands for one tower token; the tower puts CLS at position 0.
        """
        if not bool(visual.any()):
            return None
        v = self.model.config.vision_config
        side = v.image_size // v.patch_size
        full = self.model.config.vision_feature_select_strategy == "full"
        per_image = side * side + (1 if full else 0)
        counts = visual.sum(dim=1)
        if bool((counts % per_image).any()):
            row = int((counts % per_image).nonzero()[0])
            raise ValueError(
                f"row {row} has {int(counts[row])} image placeholders, which is no whole number of images of "
                f"{per_image} tokens each; give one <image> per image to the processor and let it expand them."
            )
        ordinal = visual.long().cumsum(dim=1) - 1  # [B, L]
        media, within = ordinal // per_image, ordinal % per_image
        self._check_contiguous(media, visual, "image")
        before = torch.cat([counts.new_zeros(1), (counts // per_image).cumsum(0)[:-1]])  # images of earlier rows
        patch = within - (1 if full else 0)  # "full" keeps CLS first: it has no grid cell
        layout = VisualLayout.empty(*visual.shape, 1, visual.device)
        on_grid = visual & (patch >= 0)
        values = {
            "item": media + before[:, None], "media": media, "modality": torch.zeros_like(media),
            "frame": torch.zeros_like(media), "row": torch.where(on_grid, patch // side, -1),
            "col": torch.where(on_grid, patch % side, -1),
            "kind": torch.where(on_grid, int(TokenKind.PATCH), int(TokenKind.CLS)),
        }  # fmt: skip
        for name, value in values.items():
            layout.field(name)[:] = torch.where(visual, value, -1)
        layout.tower[..., 0] = torch.where(visual, within + (0 if full else 1), -1)  # CLS is tower position 0
        return layout

    def dims(self) -> ModelDims:
        v = self.model.config.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        full = self.model.config.vision_feature_select_strategy == "full"
        vision = VisionDims(
            num_layers=v.num_hidden_layers,
            hidden=v.hidden_size,
            ffn=v.intermediate_size,
            ffn_matrices=2,
            patches_per_token=1,
            extra_tokens=0 if full else 1,  # the CLS token runs through the tower but is dropped
            tokens_per_image=patches + (1 if full else 0),
            projector_macs_per_token=self._linear_macs(self.projector),
            patch_embed_macs=v.num_channels * v.patch_size**2 * v.hidden_size,
        )
        return self._text_dims(vision)

    # -- tiny models ------------------------------------------------------------------------------
    IMAGE_SIZE, PATCH, IMAGE_TOKEN = 64, 4, 127  # 16 x 16 = 256 visual tokens per image

    @classmethod
    def tiny_model(
        cls, *, seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa", dtype=torch.float32, **kw: Any
    ) -> nn.Module:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            image_size=cls.IMAGE_SIZE, patch_size=cls.PATCH, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
        )  # fmt: skip
        text = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1, **kw,
        )  # fmt: skip
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=cls.IMAGE_TOKEN,
            image_seq_length=(cls.IMAGE_SIZE // cls.PATCH) ** 2,
            vision_feature_select_strategy="default", vision_feature_layer=-1,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
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
        images = cls._check_sample_media(images, frames, batch)
        g = torch.Generator().manual_seed(seed)
        n_visual = (cls.IMAGE_SIZE // cls.PATCH) ** 2
        dtype = next(model.parameters()).dtype
        samples = []
        for i, n_img in enumerate(images):
            ids = [1, *torch.randint(3, 100, (2 + i,), generator=g).tolist()]
            for _ in range(n_img):
                ids += [cls.IMAGE_TOKEN] * n_visual + torch.randint(3, 100, (2,), generator=g).tolist()
            ids += torch.randint(3, 100, (3 + 2 * i,), generator=g).tolist()
            sample = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            if n_img:
                sample["pixel_values"] = torch.randn(n_img, 3, cls.IMAGE_SIZE, cls.IMAGE_SIZE, generator=g).to(dtype)
            samples.append(sample)
        return samples

    @classmethod
    def collate(cls, model: nn.Module, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = model.config.text_config.pad_token_id
        width = max(s["input_ids"].shape[1] for s in samples)
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for i, s in enumerate(samples):
            n = s["input_ids"].shape[1]
            ids[i, width - n :] = s["input_ids"][0]
            mask[i, width - n :] = s["attention_mask"][0]
        out = {"input_ids": ids, "attention_mask": mask}
        pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
        return out
