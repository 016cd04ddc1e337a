"""Loading the model an evaluation runs on: a hub name, a local folder, or ``reference``.

``reference`` names the LLaVA trained on ShapesQA that ships inside vtc (``vtc.reference``), so
``vtc eval --model reference --tasks shapesqa`` needs no download and no path; ``reference-hard`` names the
LLaVA trained on ShapesQA-hard (576 visual tokens), for ``--tasks shapesqa_hard``; ``reference-video`` names
the LLaVA-OneVision trained on ShapesQA-Video (``vtc.reference.video``), for ``--tasks shapesqa_video``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: The name that stands for the reference model shipped with vtc.
REFERENCE = "reference"
#: The name that stands for the reference model trained on ShapesQA-hard (``vtc.reference.model.HARD_WEIGHTS``).
REFERENCE_HARD = "reference-hard"
#: The name that stands for the video reference model shipped with vtc (``vtc.reference.video``).
REFERENCE_VIDEO = "reference-video"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_source(name: str | Path) -> str:
    """What ``from_pretrained`` should load for `name`: the shipped weights folder for ``reference``."""
    if str(name) == REFERENCE:
        from vtc.reference.model import WEIGHTS

        return str(WEIGHTS)
    if str(name) == REFERENCE_HARD:
        from vtc.reference.model import HARD_WEIGHTS

        return str(HARD_WEIGHTS)
    if str(name) == REFERENCE_VIDEO:
        from vtc.reference.video.model import WEIGHTS as VIDEO_WEIGHTS

        return str(VIDEO_WEIGHTS)
    return str(name)


def model_label(name: str | Path) -> str:
    """A short name for runs folders, plot titles and files: ``reference`` for the shipped model (by
    name or by its weights folder), else the last part of a hub id or a folder's name."""
    path = Path(str(name))
    if str(name) == REFERENCE or (path.name == "weights" and path.parent.name == REFERENCE):
        return REFERENCE
    if str(name) == REFERENCE_HARD or (path.name == "hard" and path.parent.name == REFERENCE):
        return REFERENCE_HARD
    if str(name) == REFERENCE_VIDEO or (path.name == "weights" and path.parent.parent.name == REFERENCE):
        return REFERENCE_VIDEO
    return path.name or str(name)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on a CPU (where bfloat16 matmuls are slow and less exact)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load(name: str | Path, *, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """The model (eval mode, on `device`) and its processor, by hub name, folder or ``reference``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    where = pick_device(device)
    source = model_source(name)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=pick_dtype(dtype, where))
    try:
        processor = AutoProcessor.from_pretrained(source)
    except ImportError:
        # the video processors of Qwen2-VL, LLaVA-OneVision and LLaVA-NeXT-Video need torchvision; vtc's
        # own take their place (vtc.eval.qwen, vtc.eval.llava_video)
        processor = processor_without_torchvision(source, getattr(model.config, "model_type", ""))
    return model.to(where).eval(), processor


def processor_without_torchvision(source: str, model_type: str) -> Any:
    """The processor of a video family's checkpoint with vtc's torchvision-free video processor; re-raises
    the ImportError being handled for any other family (call it from an ``except ImportError`` block)."""
    from vtc.eval import llava_video, qwen

    if model_type in qwen.QWEN_TYPES:
        return qwen.processor_without_torchvision(source, model_type)
    if model_type in llava_video.VIDEO_TYPES:
        return llava_video.processor_without_torchvision(source, model_type)
    raise
