"""The video reference VLM: a tiny LLaVA-OneVision (SigLIP tower, MLP projector, 2x2 pooling, Qwen2 LM).

It is a stock ``LlavaOnevisionForConditionalGeneration``, the architecture LLaVA-Video uses: each frame
goes through the tower, the projector and a bilinear 2x2 pooling (an 8 x 8 patch grid becomes 4 x 4
tokens), the frames are laid end to end and one ``image_newline`` token closes the video, so a clip of
:data:`FRAMES` frames is ``8 * 16 + 1 = 129`` visual tokens. The tokenizer is the image reference
model's word-level one (:func:`vtc.reference.model.build_tokenizer`) with the video questions' words and
a ``<video>`` placeholder.

The weights folder also holds a ``LlavaOnevisionProcessor`` config (image and video processors, chat
template), so ``AutoProcessor.from_pretrained`` builds the stock processor where torchvision is installed
(transformers' video processors need it). Without torchvision, :func:`video_inputs` does what that
processor does to frames drawn at the model's size: rescale by 1/255 and normalise with the config's mean
and std (no resize: the size already matches), and expands ``<video>`` to the clip's token count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtc.eval import shapesqa_video
from vtc.reference import model as image_reference

WEIGHTS = Path(__file__).parent / "weights"
IMAGE_TOKEN, VIDEO_TOKEN = image_reference.IMAGE_TOKEN, "<video>"
SPECIALS = (*image_reference.SPECIALS, VIDEO_TOKEN)
# The image reference model's words, then those the video questions and answers add.
WORDS = tuple(
    dict.fromkeys(
        (*image_reference.WORDS, "which", "shape", "that", "appears", "appear", "first", "way", "does", "move",
         "video", "at", "end", *shapesqa_video.DIRECTIONS)
    )
)  # fmt: skip
# One user turn: the video, then the question (the image reference model's format, with <video>).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n{% elif part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
FRAMES, IMAGE_SIZE, PATCH = shapesqa_video.FRAMES, shapesqa_video.IMAGE_SIZE, 12  # 8 x 8 patches a frame
GRID = IMAGE_SIZE // PATCH
POOLED = math.ceil(GRID / 2)  # OneVision's video pooling halves each side: 4 x 4 tokens a frame
# The processor's normalisation (OneVision's defaults, OpenAI CLIP's mean and std).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def video_tokens(frames: int = FRAMES) -> int:
    """Visual tokens of a clip: ``frames * POOLED**2`` plus the one newline OneVision appends."""
    return frames * POOLED * POOLED + 1


def prompt(question: str) -> str:
    """The text the processor expands (what :data:`CHAT_TEMPLATE` renders for one user turn)."""
    return f"USER: {VIDEO_TOKEN}\n{question} ASSISTANT:"


def build_tokenizer() -> Any:
    """The word-level tokenizer over the image and video questions' words, with ``<image>`` and ``<video>``."""
    return image_reference.build_tokenizer(SPECIALS, WORDS, {"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})


def processor_config() -> dict[str, Any]:
    """``processor_config.json`` of a ``LlavaOnevisionProcessor`` for this model (nested sub-processors).

    Written by hand because transformers' video processor cannot be instantiated without torchvision;
    the keys are the ones ``save_pretrained`` writes, so ``AutoProcessor`` reads it back.
    """
    common = {
        "do_convert_rgb": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(MEAN), "image_std": list(STD), "do_resize": True, "resample": 3,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }  # fmt: skip
    return {
        "image_processor": {
            **common,
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "do_pad": True,
            "image_grid_pinpoints": [[IMAGE_SIZE, IMAGE_SIZE]],
        },
        "video_processor": {
            **common,
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "default_to_square": False,
            "do_sample_frames": False,
        },
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
        "num_image_tokens": GRID * GRID,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_1",
        "processor_class": "LlavaOnevisionProcessor",
    }


def save_processor(tokenizer: Any, folder: str | Path) -> None:
    """The tokenizer, the chat template and ``processor_config.json``, as ``LlavaOnevisionProcessor`` saves them."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "LlavaOnevisionProcessor"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps(processor_config(), indent=2, sort_keys=True) + "\n")


def pixel_values(clips: list[np.ndarray]) -> torch.Tensor:
    """``[B, F, 3, H, W]`` float32 from ``[F, H, W, 3]`` uint8 clips: rescaled and normalised as the processor does."""
    frames = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() * (1 / 255)
    if frames.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"frames are {tuple(frames.shape[-2:])} pixels; the video reference model takes {IMAGE_SIZE} x "
            f"{IMAGE_SIZE} (resize them first, or use the stock processor, which does)."
        )
    mean, std = torch.tensor(MEAN).view(1, 1, 3, 1, 1), torch.tensor(STD).view(1, 1, 3, 1, 1)
    return (frames - mean) / std


def video_inputs(tokenizer: Any, clips: list[np.ndarray], texts: list[str]) -> dict[str, torch.Tensor]:
    """One left-padded batch: each text's ``<video>`` expanded to its clip's tokens, and the clips' pixels."""
    if len(clips) != len(texts):
        raise ValueError(f"{len(clips)} clips but {len(texts)} texts; each text needs its clip.")
    expanded = []
    for clip, text in zip(clips, texts, strict=True):
        if text.count(VIDEO_TOKEN) != 1:
            raise ValueError(f"each text needs exactly one {VIDEO_TOKEN} placeholder; got {text!r}.")
        expanded.append(text.replace(VIDEO_TOKEN, VIDEO_TOKEN * video_tokens(len(clip))))
    batch = tokenizer(expanded, return_tensors="pt", padding=True)
    return {**batch, "pixel_values_videos": pixel_values(clips)}


def build_config(tokenizer: Any | None = None, *, text_layers: int = 4, text_width: int = 192) -> Any:
    """The architecture: a 4-layer SigLIP tower (128 wide, 12-pixel patches) and a Qwen2 LM (4 layers, 192 wide)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tokenizer = tokenizer or build_tokenizer()
    vision = SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, vision_use_head=False,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=64 * -(-len(tokenizer) // 64), hidden_size=text_width, intermediate_size=8 * text_width // 3,
        num_hidden_layers=text_layers, num_attention_heads=text_width // 32, num_key_value_heads=2,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]], vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def build_model(seed: int = 0, attn_implementation: str = "sdpa", **architecture: int) -> Any:
    """A freshly initialised video reference model (what training starts from)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    config = build_config(**architecture)
    return image_reference.initialised(LlavaOnevisionForConditionalGeneration, config, seed, attn_implementation)


def load(
    path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """The trained video reference model and its tokenizer, through the standard ``from_pretrained`` API."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    path = image_reference.weights_folder(path, WEIGHTS, "video reference model", "vtc.reference.video.train")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.eval(), AutoTokenizer.from_pretrained(path)
