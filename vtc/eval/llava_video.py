"""LLaVA-OneVision and LLaVA-NeXT-Video processors on a machine without torchvision.

transformers' ``LlavaOnevisionVideoProcessor`` and ``LlavaNextVideoVideoProcessor`` are
``BaseVideoProcessor`` subclasses, which need torchvision; without it they are placeholders that fail
on use, and ``AutoProcessor`` cannot load either family's processor. Their image processors fall back
to PIL ones (``LlavaOnevisionImageProcessorPil``, ``LlavaNextImageProcessorPil``) and LLaVA-NeXT's
image-only processor loads as it is; only the video side is missing.

:class:`FrameVideoProcessor` is what both video processors do, in NumPy and PIL, on frames vtc's loader
already sampled (``[T, H, W, 3]`` uint8 arrays from ``vtc.eval.video.read_frames``): resize every
frame (OneVision to a fixed ``height`` x ``width``, NeXT-Video's shortest edge, keeping the aspect),
center-crop (NeXT-Video), rescale and normalise, giving ``pixel_values_videos`` ``[B, F, C, H, W]``.
PIL's bicubic resize rounds a little differently from torchvision's (a pixel value or so); every other
step is the same arithmetic. :func:`processor_without_torchvision` builds the family's processor
around it from a checkpoint's files; ``vtc.eval.models.load`` uses it when ``AutoProcessor`` fails for
want of torchvision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from transformers.utils import PushToHubMixin

from vtc import surface
from vtc.errors import VideoError

#: OpenAI CLIP's normalisation: both families' video processors default to it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's (and transformers' PILImageResampling) number for bicubic

#: model_type -> (transformers' video processor class, its defaults: ``video_preprocessor_config.json`` keys).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llava_onevision": (
        "LlavaOnevisionVideoProcessor",
        {"size": {"height": 384, "width": 384}, "do_center_crop": False, "crop_size": None},
    ),
    "llava_next_video": (
        "LlavaNextVideoVideoProcessor",
        {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
    ),
}
VIDEO_TYPES = tuple(FAMILIES)


class FrameVideoProcessor(PushToHubMixin):
    """LLaVA-OneVision's / LLaVA-NeXT-Video's video processor without torchvision.

    Args:
        model_type: ``"llava_onevision"`` or ``"llava_next_video"`` (the defaults and the class name saved).
        size: ``{"height", "width"}`` (resize to it) or ``{"shortest_edge"}`` (resize the short side to it).
        crop_size / do_center_crop: the center crop after resizing.
        do_resize / do_rescale / rescale_factor / do_normalize / image_mean / image_std / resample: as in
            transformers' processors.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values_videos"]
    _auto_class = None  # what ProcessorMixin.save_pretrained asks of every part

    def __init__(
        self,
        model_type: str = "llava_onevision",
        *,
        size: Mapping[str, int] | None = None,
        crop_size: Mapping[str, int] | None = None,
        do_resize: bool = True,
        do_center_crop: bool | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        resample: int = BICUBIC,
    ) -> None:
        if model_type not in FAMILIES:
            raise ValueError(f"no torchvision-free video processor for {model_type!r}; vtc has {', '.join(FAMILIES)}.")
        self.model_type = model_type
        defaults = FAMILIES[model_type][1]
        self.size = dict(size or defaults["size"])
        if not ({"height", "width"} <= set(self.size) or set(self.size) == {"shortest_edge"}):
            raise ValueError(f"size must hold height and width, or shortest_edge alone; got {self.size}.")
        crop = crop_size if crop_size is not None else defaults["crop_size"]
        self.crop_size = dict(crop) if crop else None
        self.do_center_crop = bool(defaults["do_center_crop"] if do_center_crop is None else do_center_crop)
        if self.do_center_crop and not self.crop_size:
            raise ValueError("do_center_crop needs crop_size (height and width).")
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
        self.rescale_factor, self.resample = float(rescale_factor), int(resample)
        self.image_mean, self.image_std = [float(x) for x in image_mean], [float(x) for x in image_std]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model_type: str) -> FrameVideoProcessor:
        """From a saved video processor's config (or the image processor's, which shares its keys)."""
        kept = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor")
        kept += ("do_normalize", "image_mean", "image_std", "resample")
        return cls(model_type, **{k: config[k] for k in kept if config.get(k) is not None})

    # -- the pipeline -----------------------------------------------------------------------------------------
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing (before any crop)."""
        if not self.do_resize:
            return height, width
        if "height" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        short = int(self.size["shortest_edge"])
        if width <= height:
            return int(short * height / width), short
        return short, int(short * width / height)

    def _frames(self, video: Any) -> np.ndarray:
        """``[T, 3, h, w]`` float32: resized, cropped, rescaled, normalised."""
        from PIL import Image

        clip = np.asarray(video)
        if clip.ndim == 3:
            clip = clip[None]
        if clip.ndim != 4 or clip.shape[-1] != 3 or len(clip) == 0:
            raise ValueError(f"a video must be [frames, height, width, 3] RGB with a frame at least; got {clip.shape}.")
        h, w = self.output_size(*clip.shape[1:3])
        frames = np.stack(
            [
                np.asarray(Image.fromarray(f.astype(np.uint8)).resize((w, h), self.resample))
                if (h, w) != f.shape[:2]
                else f.astype(np.uint8)
                for f in clip
            ]
        )
        if self.do_center_crop:
            frames = _center_crop(frames, int(self.crop_size["height"]), int(self.crop_size["width"]))
        out = frames.transpose(0, 3, 1, 2).astype(np.float32)
        if self.do_rescale:
            out = out * np.float32(self.rescale_factor)
        if self.do_normalize:
            mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (self.image_mean, self.image_std))
            out = (out - mean) / std
        return out.astype(np.float32)

    def __call__(self, videos: Any, *, return_tensors: Any = None, **_: Any) -> Any:
        """``{"pixel_values_videos": [B, F, C, H, W]}`` for a video or a list of them (frames already sampled)."""
        from transformers import BatchFeature

        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        clips = [self._frames(v) for v in videos]
        counts = sorted({len(c) for c in clips})
        if len(counts) > 1:
            raise VideoError(
                f"the clips of one batch have different frame counts ({', '.join(map(str, counts))}); "
                f"{self.model_type}'s video input is one [batch, frames, ...] tensor. Run with --batch-size 1, "
                f"or let every clip give the same count (--short-videos error or repeat)."
            )
        return BatchFeature({"pixel_values_videos": np.stack(clips)}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        """The config saved with the processor: transformers' class name, so that an install with
        torchvision loads its own video processor from it."""
        return {
            "video_processor_type": FAMILIES[self.model_type][0],
            "size": dict(self.size),
            "crop_size": dict(self.crop_size) if self.crop_size else None,
            "do_resize": self.do_resize,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": self.resample,
            "do_convert_rgb": True,
            "default_to_square": False,
            "do_sample_frames": False,
        }


def _center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[T, H, W, C]`` cropped to the middle `height` x `width`, zero-padded first where smaller (as torchvision)."""
    _, h, w, _ = frames.shape
    if height > h or width > w:
        top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
        pad = ((0, 0), (top, max(height - h, 0) - top), (left, max(width - w, 0) - left), (0, 0))
        frames = np.pad(frames, pad)
        _, h, w, _ = frames.shape
    top, left = (h - height) // 2, (w - width) // 2
    return frames[:, top : top + height, left : left + width]


def assemble(cls: type, video_processor: Any, **parts: Any) -> Any:
    """``cls(**parts, video_processor=...)`` for a LLaVA video processor class, accepting a
    :class:`FrameVideoProcessor` where transformers' class check would refuse it."""
    return surface.processor_with_video_part(cls, video_processor, **parts)


def processor_without_torchvision(source: str, model_type: str) -> Any:
    """A LLaVA-OneVision / LLaVA-NeXT-Video processor from a checkpoint's files, built without torchvision:
    its tokenizer and chat template, the PIL image processor, a :class:`FrameVideoProcessor`, and the
    processor's own settings (``num_image_tokens``, ``patch_size``, ``vision_feature_select_strategy``, ...)."""
    import transformers
    from transformers import AutoTokenizer

    if model_type not in FAMILIES:
        raise ValueError(f"no torchvision-free processor for {model_type!r}; vtc has {', '.join(FAMILIES)}.")

    def read(name: str) -> str | None:
        return surface.checkpoint_text(source, name)

    # transformers 5.2x saves one processor_config.json holding every part; older saves kept them apart
    joint = json.loads(read("processor_config.json") or "{}")
    images = joint.get("image_processor") or json.loads(read("preprocessor_config.json") or "{}")
    videos = joint.get("video_processor") or json.loads(read("video_preprocessor_config.json") or "null") or images
    if model_type == "llava_onevision":
        cls, image_cls = transformers.LlavaOnevisionProcessor, transformers.LlavaOnevisionImageProcessorPil
    else:
        cls, image_cls = transformers.LlavaNextVideoProcessor, transformers.LlavaNextImageProcessorPil
    image_keys = ("size", "crop_size", "image_grid_pinpoints", "do_resize", "do_center_crop", "do_rescale")
    image_keys += ("rescale_factor", "do_normalize", "image_mean", "image_std", "do_pad", "do_convert_rgb", "resample")
    image_processor = image_cls(**{k: images[k] for k in image_keys if images.get(k) is not None})
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = read("chat_template.jinja") or json.loads(read("chat_template.json") or "{}").get("chat_template")
    settings = ("num_image_tokens", "vision_feature_select_strategy", "image_token", "video_token")
    settings += ("vision_aspect_ratio", "patch_size", "num_additional_image_tokens")
    kwargs = {k: joint[k] for k in settings if joint.get(k) is not None}
    return assemble(
        cls,
        FrameVideoProcessor.from_config(videos, model_type),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template or tokenizer.chat_template,
        **kwargs,
    )
