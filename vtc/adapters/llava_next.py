"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres tiles of a CLIP tower, Llama-style LM.

LLaVA-NeXT encodes an image as a base view plus a grid of tiles, each one tower pass; the tile grid loses
the rows or columns that only cover padding, and an image-newline token ends each of its rows
(``vtc.adapters.anyres``). The tower runs per view, so there is no tower stage here: methods that need
one are refused from the capabilities, or fall back to the embeddings where they can.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from vtc.adapters import anyres
from vtc.adapters.base import Adapter
from vtc.adapters.registry import register_adapter
from vtc.errors import UnsupportedModelError
from vtc.flops import ModelDims, VisionDims
from vtc.state import VisualLayout

#: Towers whose per-view output layout vtc knows: whether a CLS token comes first.
_TOWER_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


@register_adapter
class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT (LLaVA-1.6) checkpoints in transformers' native format.

    Layout of an image (see ``anyres.image_tokens``): the base view's ``side x side`` patches first (crop
    -1), then the unpadded tile grid in raster order, each row ended by a newline token. A tile token's
    ``crop`` is its tile in raster order over the tile grid and its row / column count from the first
    surviving cell of that tile, so each (media, frame, crop) group of patches is a full rectangle. A
    newline has crop -1, row = the packed grid row it ends, col -1 and no tower patch. ``tower`` positions
    index the item's tower output: its views one after the other (base first), CLS included per view.
    """

    name = "llava_next"
    model_types = ("llava_next",)
    capabilities = frozenset({"attn_tap", "final_norm"})
    modalities: ClassVar[frozenset[str]] = frozenset({"image"})

    model_class = "LlavaNextForConditionalGeneration"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = self.model.config
        tower = getattr(config.vision_config, "model_type", None)
        if tower not in _TOWER_CLS:
            raise UnsupportedModelError(
                f"vtc knows the CLIP and SigLIP towers of {self.model_class}; this one is {tower!r}."
            )
        strategy = config.vision_feature_select_strategy
        if _TOWER_CLS[tower] != (strategy == "default"):
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={strategy!r} with a {tower} tower leaves no square patch grid "
                f"(the model itself cannot pack it); use 'default' with CLIP (drops CLS) or 'full' with SigLIP."
            )

    def _vision_parts(self, vlm: nn.Module) -> tuple[nn.Module, nn.Module]:
        return vlm.vision_tower, vlm.multi_modal_projector

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id,)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def vision_grid(self) -> int:
        v = self.model.config.vision_config
        return v.image_size // v.patch_size

    @property
    def vision_has_cls(self) -> bool:
        return _TOWER_CLS[self.model.config.vision_config.model_type]

    @property
    def _per_view(self) -> int:
        """Tokens of one view's tower output (CLS included)."""
        return self.vision_grid**2 + int(self.vision_has_cls)

    @property
    def _first(self) -> int:
        """Position of a view's first patch in its tower output."""
        return int(self.vision_has_cls)

    def _tile_limit(self) -> int | None:
        """OneVision's cap on the unpadded grid (in tiles); None: no cap."""
        return None

    def _plan(self, size: Any) -> anyres.ImagePlan:
        c = self.model.config
        return anyres.plan_image(
            size, self.vision_grid, c.vision_config.image_size, c.image_grid_pinpoints, self._tile_limit()
        )

    # -- the layout -------------------------------------------------------------------------------
    def _image_items(self, kwargs: dict) -> list[anyres.ItemTokens] | None:
        """The images of a forward in the order the model encodes them; None when the inputs do not say."""
        sizes = kwargs.get("image_sizes")
        if sizes is not None and kwargs.get("pixel_values") is not None:
            return [anyres.image_tokens(p, self._per_view, self._first) for p in self._image_plans(kwargs, sizes)]
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return None
        c, side = self.model.config, self.vision_grid
        items = []
        for features in encoded.pooler_output:
            rows, cols = anyres.packed_grid(features, self.vlm.image_newline, side)
            if rows:
                args = (c.vision_config.image_size, c.image_grid_pinpoints, self._tile_limit())
                plan = anyres.plan_from_grid(rows, cols, side, *args)
            else:
                plan = anyres.ImagePlan(side)
            items.append(anyres.image_tokens(plan, self._per_view, self._first))
        return items

    def _image_plans(self, kwargs: dict, sizes: torch.Tensor) -> list[anyres.ImagePlan]:
        return [self._plan(size) for size in sizes.tolist()]

    def _video_items(self, kwargs: dict) -> list[anyres.ItemTokens] | None:
        """The videos of a forward, in the model's order (families with video override this)."""
        return None

    def _modality_masks(self, visual: torch.Tensor, kwargs: dict) -> dict[int, torch.Tensor]:
        """``{0: image placeholders, 1: video placeholders}`` ``[B, L]`` of the forward."""
        config = self.model.config
        ids = {0: config.image_token_id}
        if "video" in self.modalities:
            ids[1] = config.video_token_id
        input_ids = kwargs.get("input_ids")
        if input_ids is not None:
            return {m: (input_ids == i) & visual for m, i in ids.items()}
        embeds = kwargs["inputs_embeds"]
        table = self.vlm.get_input_embeddings()
        marks = {m: table(torch.tensor(i, device=embeds.device)).to(embeds.dtype) for m, i in ids.items()}
        return {m: (embeds == mark).all(dim=-1) & visual for m, mark in marks.items()}

    def layout(self, visual: torch.Tensor, kwargs: dict) -> VisualLayout | None:
        """Images (and videos) from ``image_sizes`` and the pixel shapes, or from the encoded features that
        ``generate`` passes instead; see the class docstring for the conventions."""
        if not bool(visual.any()):
            return None
        layout = VisualLayout.empty(*visual.shape, anyres.TOWER_WIDTH, visual.device)
        sources = {0: (self._image_items, "image", "image_sizes"), 1: (self._video_items, "video", "frames")}
        for modality, mask in self._modality_masks(visual, kwargs).items():
            if not bool(mask.any()):
                continue
            make, what, described = sources[modality]
            items = make(kwargs)
            if items is None:
                raise ValueError(
                    f"the input has {what} placeholders but no {what} features vtc can place; pass the "
                    f"processor's pixel values with {described} (or the model's encoded features)."
                )
            self._fill(layout, mask, items, modality, what, described)
        key = layout.field("item") * 2 + layout.field("modality")
        self._check_contiguous(key, visual, "item")
        media = layout.field("media")
        for b in range(visual.shape[0]):
            keys = key[b][visual[b]]
            if len(keys):
                starts = torch.cat([keys.new_ones(1, dtype=torch.bool), keys[1:] != keys[:-1]])
                media[b][visual[b]] = starts.long().cumsum(0) - 1
        return layout

    @staticmethod
    def _fill(
        layout: VisualLayout, mask: torch.Tensor, items: list[anyres.ItemTokens], modality: int, what: str, by: str
    ) -> None:
        """Assign `items` (the model's order: rows in order, then left to right) to the placeholders in `mask`."""
        total, sizes = int(mask.sum()), [len(item) for item in items]
        if total != sum(sizes):
            raise ValueError(
                f"the input has {total} {what} placeholders but {by} describes {sum(sizes)} tokens ({len(items)} "
                f"{what}s of {sizes}); pass the input_ids and {by} the processor made together."
            )
        device = mask.device
        k = 0
        for b in range(mask.shape[0]):
            pos = mask[b].nonzero().flatten()
            start = 0
            while start < len(pos):
                item = items[k]
                at = pos[start : start + len(item)]
                if len(at) < len(item):
                    raise ValueError(
                        f"row {b} has {len(pos)} {what} placeholders, which ends inside {what} {k} "
                        f"({len(item)} tokens); each row's placeholders must match its own {what}s ({by})."
                    )
                layout.field("item")[b, at] = k
                layout.field("modality")[b, at] = modality
                for j, name in enumerate(anyres.ITEM_FIELDS):
                    layout.field(name)[b, at] = item.table[:, j].to(device)
                layout.tower[b, at] = item.tower.to(device)
                k, start = k + 1, start + len(item)

    # -- FLOPs ------------------------------------------------------------------------------------
    def dims(self) -> ModelDims:
        return self._text_dims(self._vision_dims())

    def _vision_dims(self) -> VisionDims:
        v = self.model.config.vision_config
        return VisionDims(
            num_layers=v.num_hidden_layers,
            hidden=v.hidden_size,
            ffn=v.intermediate_size,
            ffn_matrices=2,
            patches_per_token=1,
            extra_tokens=int(self.vision_has_cls),
            tokens_per_image=None,
            projector_macs_per_token=self._linear_macs(self.projector),
            patch_embed_macs=v.num_channels * v.patch_size**2 * v.hidden_size,
            patches_per_pass=self.vision_grid**2,
        )

    def _pass_tokens(self, modality: int) -> int:
        """Tokens the projector maps per tower pass of an image (0) or a video frame (1)."""
        return self.vision_grid**2

    def image_token_counts(self, visual: torch.Tensor, layout: VisualLayout | None = None) -> list[int]:
        """One entry per tower pass (``VisionDims.patches_per_pass``): the tokens its projector maps.

        With the forward's `layout`, each image counts its base view and every tile that kept a patch, each
        video its frames. Without it (the placeholders alone), each contiguous run counts as one image of as
        many full views as its tokens fill (an estimate: unpadding and newlines are not undone).
        """
        side2 = self.vision_grid**2
        if layout is None:
            counts = []
            for run in super().image_token_counts(visual):
                counts += [side2] * max(1, round(run / side2))
            return counts
        counts = []
        item, modality = layout.field("item"), layout.field("modality")
        for m in (0, 1):
            for k in torch.unique(item[(modality == m) & visual]).tolist():
                sel = (item == k) & (modality == m) & visual
                if m == 0:
                    views = int(layout.tower[sel].max()) // self._per_view + 1
                else:
                    views = int(layout.field("frame")[sel].max()) + 1
                counts += [self._pass_tokens(m)] * views
        return counts

    # -- tiny models ------------------------------------------------------------------------------
    #: A view is 32 x 32 pixels in 4 x 4 patches: 8 x 8 = 64 tokens; tiles of 1 x 2, 2 x 1 or 2 x 2 views.
    TILE, PATCH, IMAGE_TOKEN, VIDEO_TOKEN = 32, 4, 127, 126
    PINPOINTS: ClassVar[list[list[int]]] = [[32, 64], [64, 32], [64, 64]]
    #: Whether an image in a row of several takes the base view alone (OneVision's ``batch_num_images``).
    MULTI_IMAGE_BASE_ONLY: ClassVar[bool] = False
    #: ``image_sizes`` the tiny samples cycle through: different tile grids and unpadded windows.
    SIZES: ClassVar[list[tuple[int, int]]] = [(60, 50), (40, 64), (90, 40), (32, 60)]

    @classmethod
    def _tiny_vision(cls) -> Any:
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            image_size=cls.TILE, patch_size=cls.PATCH, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
        )  # fmt: skip

    @classmethod
    def _tiny_text(cls, num_layers: int, **kw: Any) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1, **kw,
        )  # fmt: skip

    @classmethod
    def _tiny_config(cls, num_layers: int, **kw: Any) -> Any:
        from transformers import LlavaNextConfig

        return LlavaNextConfig(
            vision_config=cls._tiny_vision(), text_config=cls._tiny_text(num_layers, **kw),
            image_token_index=cls.IMAGE_TOKEN, image_grid_pinpoints=cls.PINPOINTS,
            vision_feature_select_strategy="default", vision_feature_layer=-1,
        )  # fmt: skip

    @classmethod
    def _model_cls(cls) -> type[nn.Module]:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def tiny_model(
        cls, *, seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa", dtype=torch.float32, **kw: Any
    ) -> nn.Module:
        config = cls._tiny_config(num_layers, **kw)
        torch.manual_seed(seed)
        model = cls._model_cls()._from_config(config, attn_implementation=attn_implementation)
        return model.to(dtype).eval()

    @classmethod
    def _image_count(cls, model: nn.Module, size: tuple[int, int], multi: bool) -> tuple[int, int]:
        """(placeholders, tower views) of one image of `size` in the tiny model."""
        c = model.config
        side = c.vision_config.image_size // c.vision_config.patch_size
        limit = anyres.max_tiles(getattr(c, "vision_aspect_ratio", None))
        if multi and cls.MULTI_IMAGE_BASE_ONLY:
            plan = anyres.ImagePlan(side)
        else:
            plan = anyres.plan_image(size, side, c.vision_config.image_size, c.image_grid_pinpoints, limit)
        return plan.num_tokens, plan.views

    @classmethod
    def _video_count(cls, model: nn.Module, frames: int) -> int:
        raise ValueError(f"{cls.model_class} takes no video; pass frames=None.")

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
        """Rows of different lengths: ``images[i]`` images (sizes cycling through ``SIZES``, so the tile grids
        differ), then one video of ``frames[i]`` frames (0: none). With `frames` and no `images`, no images."""
        if images is None:
            images = [0] * len(frames) if frames is not None else [1] * batch
        frames = [0] * len(images) if frames is None else frames
        if len(frames) != len(images):
            raise ValueError(f"images and frames give one count per row; got {len(images)} and {len(frames)}.")
        g = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype
        tile = model.config.vision_config.image_size
        samples, shown = [], 0
        for i, (n_img, n_frames) in enumerate(zip(images, frames, strict=True)):
            ids = [1, *torch.randint(3, 100, (2 + i,), generator=g).tolist()]
            sizes, tiles = [], []
            for _ in range(n_img):
                size = cls.SIZES[shown % len(cls.SIZES)]
                shown += 1
                n_tokens, views = cls._image_count(model, size, multi=n_img > 1)
                ids += [cls.IMAGE_TOKEN] * n_tokens + torch.randint(3, 100, (2,), generator=g).tolist()
                sizes.append(size)
                tiles.append(torch.randn(views, 3, tile, tile, generator=g))
            if n_frames:
                ids += [cls.VIDEO_TOKEN] * cls._video_count(model, n_frames)
                ids += torch.randint(3, 100, (2,), generator=g).tolist()
            ids += torch.randint(3, 100, (3 + 2 * i,), generator=g).tolist()
            sample = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            if n_img:
                width = max(t.shape[0] for t in tiles)
                sample["pixel_values"] = torch.stack([cls._pad_views(t, width) for t in tiles]).to(dtype)
                sample["image_sizes"] = torch.tensor(sizes)
                cls._add_image_extras(sample, n_img)
            if n_frames:
                sample["pixel_values_videos"] = torch.randn(1, n_frames, 3, tile, tile, generator=g).to(dtype)
            samples.append(sample)
        return samples

    @staticmethod
    def _pad_views(views: torch.Tensor, width: int) -> torch.Tensor:
        """``[views, 3, H, W]`` zero-padded to `width` views, as the processor pads a batch's images."""
        return torch.cat([views, views.new_zeros(width - views.shape[0], *views.shape[1:])])

    @classmethod
    def _add_image_extras(cls, sample: dict[str, torch.Tensor], n_images: int) -> None:
        """Further per-image inputs the family's processor emits (OneVision: ``batch_num_images``)."""

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
            views = max(p.shape[1] for p in pixels)
            out["pixel_values"] = torch.cat([torch.stack([cls._pad_views(v, views) for v in p]) for p in pixels])
            out["image_sizes"] = torch.cat([s["image_sizes"] for s in samples if "image_sizes" in s])
            cls._collate_image_extras(out, samples)
        videos = [s["pixel_values_videos"] for s in samples if "pixel_values_videos" in s]
        if videos:
            if len({v.shape[1] for v in videos}) > 1:
                raise ValueError(
                    f"{cls.model_class} takes the videos of a batch as one [videos, frames, ...] tensor; these have "
                    f"{sorted(v.shape[1] for v in videos)} frames. Sample the same number of frames for every video."
                )
            out["pixel_values_videos"] = torch.cat(videos)
        return out

    @classmethod
    def _collate_image_extras(cls, out: dict[str, torch.Tensor], samples: list[dict[str, torch.Tensor]]) -> None:
        """Batch the per-image inputs of ``_add_image_extras``."""
