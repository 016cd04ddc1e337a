"""The adapter base: finds a model family's parts and describes its visual tokens.

An adapter is stateless: it holds the model's parts (vision tower, projector, text backbone, decoder
layers, final norm, LM head) and says where a forward's visual tokens sit and how the family numbers
positions. Everything that runs during a forward (pruning stages, taps, caches) belongs to a session
(``vtc.engine``), which works through the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vtc import surface
from vtc.errors import UnsupportedModelError
from vtc.state import VisualLayout

if TYPE_CHECKING:
    from vtc.flops import ModelDims


class Adapter:
    """Base of the per-family adapters.

    A subclass names the ``model_types`` it serves, finds the parts in ``_find_parts`` and says how
    visual tokens are marked in ``visual_mask``. Everything that touches masks, positions and caches is
    here, shared by every family.

    Attributes:
        model: the wrapped ``*ForConditionalGeneration`` model.
        vlm: its multimodal base model (``model.model``).
        text_model: the text backbone (``LlamaModel``, ``Qwen2VLTextModel``, ...).
        layers: the text backbone's decoder layers.
        final_norm: the text backbone's final norm.
        lm_head: the output projection.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[frozenset[str]] = frozenset({"attn_tap", "final_norm"})
    #: The media the family's model takes: ``"image"``, and ``"video"`` where it has a video path.
    modalities: ClassVar[frozenset[str]] = frozenset({"image"})
    #: True where the model numbers positions itself from the attention mask (M-RoPE): a padded batch
    #: then needs no explicit ``position_ids`` in a plain forward.
    mrope: ClassVar[bool] = False
    #: True where the model takes a batch's videos as one ``[videos, frames, ...]`` tensor, so every
    #: video of a batch has the same number of frames (LLaVA-OneVision, LLaVA-NeXT-Video).
    equal_frames: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._find_parts()
        self.text_config = self.text_model.config
        self.num_layers = len(self.layers)
        types = getattr(self.text_config, "layer_types", None)
        #: Per decoder layer, its attention type (``full_attention`` or ``sliding_attention``).
        self.layer_types = list(types) if types else ["full_attention"] * self.num_layers
        #: Layer shapes for the FLOPs formula (derived from the config once).
        self.model_dims = self.dims()

    # -- family-specific --------------------------------------------------------------------------
    #: The model class this adapter wraps, for error messages.
    model_class: ClassVar[str] = ""

    def _vision_parts(self, vlm: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The multimodal model's vision tower and projector."""
        raise NotImplementedError

    def _find_parts(self) -> None:
        """Find the multimodal model, text backbone, layers, final norm, LM head, tower and projector."""
        vlm = getattr(self.model, "model", None)
        try:
            if vlm is None or not hasattr(self.model, "lm_head"):
                raise AttributeError
            self.vision_tower, self.projector = self._vision_parts(vlm)
            self.text_model = vlm.language_model
        except AttributeError:
            raise UnsupportedModelError(
                f"vtc wraps {self.model_class}; got {type(self.model).__name__}. "
                f"Pass the model with the LM head (the one that has .generate)."
            ) from None
        self.vlm = vlm
        self.layers = self.text_model.layers
        self.final_norm = self.text_model.norm
        self.lm_head = self.model.lm_head

    def visual_token_ids(self) -> tuple[int, ...]:
        """Token ids of visual placeholders (image, and video where the family has it)."""
        raise NotImplementedError

    def dims(self) -> ModelDims:
        """Layer shapes for the FLOPs formula."""
        raise NotImplementedError

    def visual_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """``[B, L]`` true at visual placeholder positions of the multimodal model's input."""
        ids = self.visual_token_ids()
        if input_ids is not None:
            return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        if inputs_embeds is None:
            raise ValueError("the model was called with neither input_ids nor inputs_embeds.")
        # As transformers does when only embeddings are given: compare with the placeholder embeddings.
        table = self.vlm.get_input_embeddings()
        marks = table(torch.tensor(ids, device=inputs_embeds.device)).to(inputs_embeds.dtype)  # [n_ids, d]
        return (inputs_embeds[:, :, None, :] == marks).all(dim=-1).any(dim=-1)

    def attention_module(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def layout(self, visual: torch.Tensor, kwargs: dict) -> VisualLayout | None:
        """Where each visual token of a forward sits (``vtc.state.VisualLayout``); None without visual tokens.

        Raises ``ValueError`` when the placeholders do not fit the features the inputs describe (a count
        that is no whole number of images, an image whose placeholders are not contiguous).

        Args:
            visual: ``[B, L]`` visual placeholders of the multimodal model's input.
            kwargs: the multimodal model's keyword arguments (``input_ids``, image / video grids).
        """
        return None

    @staticmethod
    def _check_contiguous(media: torch.Tensor, visual: torch.Tensor, what: str) -> None:
        """Each (row, media) run of visual tokens must be contiguous: input position minus ordinal is constant."""
        ordinal = visual.long().cumsum(dim=1) - 1
        offset = torch.arange(visual.shape[1], device=visual.device) - ordinal  # [B, L]
        key = torch.where(visual, media, -1)
        for b in range(visual.shape[0]):
            for m in key[b][visual[b]].unique().tolist():
                gaps = offset[b][key[b] == m].unique()
                if len(gaps) > 1:
                    raise ValueError(
                        f"row {b}: the placeholders of {what} {m} are not contiguous (text between them); "
                        f"each image's placeholders must form one run, as the processor writes them."
                    )

    def _text_dims(self, vision: Any = None) -> ModelDims:
        """The decoder's shapes from the (standard) text config fields."""
        from vtc.flops import ModelDims

        c = self.text_config
        heads = c.num_attention_heads
        return ModelDims(
            name=getattr(self.model.config, "_name_or_path", "") or self.name,
            num_layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab=c.vocab_size,
            vision=vision,
        )

    @staticmethod
    def _linear_macs(module: nn.Module) -> int:
        """Multiply-adds per token of all linear layers in `module` (a projector applied per token)."""
        return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    def image_token_counts(self, visual: torch.Tensor) -> list[int]:
        """LLM visual tokens of each image in a batch: contiguous visual runs, split at fixed image sizes."""
        dims = self.model_dims
        per_image = dims.vision.tokens_per_image if dims is not None and dims.vision is not None else None
        counts: list[int] = []
        for row in visual.cpu():
            zero = torch.zeros(1, dtype=torch.int)
            edges = torch.diff(row.int(), prepend=zero, append=zero)  # +1 where a run starts, -1 after it ends
            starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
            for run in (ends - starts).tolist():
                while per_image and run > per_image:
                    counts.append(per_image)
                    run -= per_image
                counts.append(run)
        return counts

    # -- vision tower -----------------------------------------------------------------------------
    def vision_encoder_layers(self) -> nn.ModuleList | None:
        """The vision tower's transformer layers, where the family supports tower stages (else None)."""
        return None

    @property
    def vision_grid(self) -> int:
        """Patches per side of one image in the tower."""
        raise NotImplementedError

    @property
    def vision_has_cls(self) -> bool:
        return False

    # -- positions --------------------------------------------------------------------------------
    def prompt_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The position ids a prompt's tokens take (``[B, L]``; pads get 0), for callers that feed the
        model in pieces and pass positions (a decoding loop); text after the prompt continues from
        ``positions.amax(...) + 1`` in each row."""
        return (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    def text_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further arguments a forward of text tokens only needs besides ids, mask and positions."""
        return {}

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotary ``(cos, sin)`` of the text model for ``[B, L]`` positions (or the family's own layout)."""
        return surface.rotary(self.text_model, hidden, positions)

    # -- tiny models for tests and demos ----------------------------------------------------------
    @classmethod
    def tiny_model(cls, *, seed: int = 0, num_layers: int = 4, attn_implementation: str = "sdpa", **kw: Any):
        """A small random model of this family, built in process (no download)."""
        raise NotImplementedError

    @classmethod
    def make_samples(
        cls,
        model: nn.Module,
        *,
        batch: int = 2,
        seed: int = 0,
        images: list[int] | None = None,
        frames: list[int] | None = None,
    ):
        """Unpadded single-row inputs of different prompt lengths: ``images[i]`` images in row i (one each
        by default), then, where ``frames`` is given, a video of ``frames[i]`` frames (0: none; rows then
        have no images unless ``images`` says so). Families without video raise ``ValueError``."""
        raise NotImplementedError

    @classmethod
    def _check_sample_media(cls, images: list[int] | None, frames: list[int] | None, batch: int) -> list[int]:
        """The images per row for ``make_samples``, after checking that the family takes the media asked for."""
        if frames is not None and "video" not in cls.modalities:
            raise ValueError(f"the {cls.name!r} family takes no video; pass images only.")
        if images is None:
            images = [0 if frames is not None else 1] * batch
        return images

    @classmethod
    def collate(cls, model: nn.Module, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch samples with left padding, as a processor with ``padding_side='left'`` would."""
        raise NotImplementedError
