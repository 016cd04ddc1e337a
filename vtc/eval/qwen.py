"""Qwen2-VL / Qwen2.5-VL processors on a machine without torchvision.

transformers' ``Qwen2VLVideoProcessor`` (and ``BaseVideoProcessor`` under it) needs torchvision, and
without it ``Qwen2VLProcessor`` cannot even be built: its constructor checks the video processor's
class against one that torchvision-less installs do not export, and fails for ``None`` too. Images
have a torchvision-free path (``Qwen2VLImageProcessorPil``, which ``AutoImageProcessor`` falls back
to), videos do not.

:class:`FrameVideoProcessor` is Qwen2-VL's video preprocessing in NumPy and PIL: every frame resized
to one ``smart_resize`` size (bicubic, as the torchvision processor does, though PIL's bicubic rounds
a little differently), rescaled, normalised, and cut into ``temporal_patch_size`` x ``patch_size``
x ``patch_size`` patches in the order the vision tower expects, with a short clip padded by repeating
its last frame. It takes frames as arrays (``[T, H, W, 3]`` uint8, what ``vtc.eval.video.read_frames``
returns) and samples none itself: vtc's loader already chose them. :func:`assemble` builds the
processor around it, and ``vtc.eval.models.load`` uses both when ``AutoProcessor`` fails for a Qwen
checkpoint for want of torchvision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from transformers.utils import PushToHubMixin

from vtc import surface

#: Qwen2-VL's CLIP normalisation and its video processor's defaults (``video_preprocessor_config.json``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")


class FrameVideoProcessor(PushToHubMixin):
    """Qwen2-VL's video processor without torchvision; returns what ``Qwen2VLVideoProcessor`` returns.

    Args:
        min_pixels / max_pixels: the area budget of every frame (the video processor's ``size``).
        patch_size / temporal_patch_size / merge_size: the vision tower's.
        image_mean / image_std: normalisation.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values_videos", "video_grid_thw"]
    _auto_class = None  # what ProcessorMixin.save_pretrained asks of every part

    def __init__(
        self,
        *,
        min_pixels: int = VIDEO_MIN_PIXELS,
        max_pixels: int = VIDEO_MAX_PIXELS,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = [float(x) for x in image_mean], [float(x) for x in image_std]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FrameVideoProcessor:
        """From a ``video_preprocessor_config.json`` (or an image processor's config as the fallback)."""
        size = config.get("size") or {}
        return cls(
            min_pixels=config.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS,
            max_pixels=config.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS,
            patch_size=config.get("patch_size", 14),
            temporal_patch_size=config.get("temporal_patch_size", 2),
            merge_size=config.get("merge_size", 2),
            image_mean=config.get("image_mean") or CLIP_MEAN,
            image_std=config.get("image_std") or CLIP_STD,
        )

    def _frames(self, video: Any) -> np.ndarray:
        """``[T, 3, h, w]`` float32: resized, rescaled, normalised; T padded to the temporal patch."""
        from PIL import Image

        clip = np.asarray(video)
        if clip.ndim == 3:
            clip = clip[None]
        if clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"a video must be [frames, height, width, 3] RGB; got shape {clip.shape}.")
        height, width = clip.shape[1:3]
        factor = self.patch_size * self.merge_size
        h, w = surface.qwen_smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        frames = [
            np.asarray(Image.fromarray(f.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
            for f in clip
        ]
        mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (self.image_mean, self.image_std))
        out = (np.stack(frames).transpose(0, 3, 1, 2) / 255.0 - mean) / std
        if pad := -len(out) % self.temporal_patch_size:
            out = np.concatenate([out, np.repeat(out[-1:], pad, axis=0)])
        return out.astype(np.float32)

    def patchify(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Flat patches ``[t * h * w, 3 * tp * p * p]`` in the tower's order (merge windows contiguous)."""
        t_patch, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        n, c, height, width = frames.shape
        grid = [n // t_patch, height // p, width // p]
        x = frames.reshape(grid[0], t_patch, c, grid[1] // m, m, p, grid[2] // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, tp, p, p
        return x.reshape(grid[0] * grid[1] * grid[2], c * t_patch * p * p), grid

    def __call__(
        self,
        videos: Any,
        *,
        video_metadata: Any = None,
        return_metadata: bool = False,
        return_tensors: Any = None,
        **_: Any,
    ) -> Any:
        from transformers import BatchFeature

        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        patches, grids = [], []
        for video in videos:
            flat, grid = self.patchify(self._frames(video))
            patches.append(flat)
            grids.append(grid)
        data: dict[str, Any] = {
            "pixel_values_videos": np.concatenate(patches),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }
        out = BatchFeature(data, tensor_type=return_tensors)
        if return_metadata:  # Qwen2.5-VL reads each clip's sampled fps from it (for second_per_grid_ts)
            out["video_metadata"] = video_metadata or [surface.video_metadata(len(v)) for v in videos]
        return out

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs: Any = None) -> int:
        h, w = surface.qwen_smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        frames = num_frames + (-num_frames % self.temporal_patch_size)
        return frames // self.temporal_patch_size * (h // self.patch_size) * (w // self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        """The config saved with the processor: transformers' class name, so that an install with
        torchvision loads its own ``Qwen2VLVideoProcessor`` from it."""
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }


def assemble(cls: type, image_processor: Any, tokenizer: Any, video_processor: Any, chat_template: Any = None) -> Any:
    """``cls(image_processor, tokenizer, video_processor, chat_template)`` for a Qwen processor class,
    accepting a :class:`FrameVideoProcessor` (or ``None``) where transformers' class check would refuse it."""
    return surface.processor_with_video_part(
        cls, video_processor, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def processor_without_torchvision(source: str, model_type: str) -> Any:
    """A Qwen2-VL / Qwen2.5-VL processor from a checkpoint's files, built without torchvision:
    its tokenizer and chat template, the PIL image processor, and a :class:`FrameVideoProcessor`."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    def read(name: str) -> str | None:
        return surface.checkpoint_text(source, name)

    # transformers 5.2x saves one processor_config.json holding every part; older saves kept them apart
    joint = json.loads(read("processor_config.json") or "{}")
    images = joint.get("image_processor") or json.loads(read("preprocessor_config.json") or "{}")
    videos = joint.get("video_processor") or json.loads(read("video_preprocessor_config.json") or "null") or images
    kept = ("size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")
    kept += ("image_mean", "image_std", "do_convert_rgb", "do_resize", "do_rescale", "do_normalize")
    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in images.items() if k in kept})
    tokenizer = AutoTokenizer.from_pretrained(source)
    template = read("chat_template.jinja") or json.loads(read("chat_template.json") or "{}").get("chat_template")
    cls = Qwen2_5_VLProcessor if model_type == "qwen2_5_vl" else Qwen2VLProcessor
    video_processor = FrameVideoProcessor.from_config(videos)
    return assemble(cls, image_processor, tokenizer, video_processor, template or tokenizer.chat_template)
