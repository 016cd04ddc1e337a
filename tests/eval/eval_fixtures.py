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
    if not _MODEL:
        from vtc.adapters.llava import LlavaAdapter

        _MODEL["model"] = LlavaAdapter.tiny_model(num_layers=4)
        _MODEL["processor"] = tiny_processor()
    return _MODEL["model"], _MODEL["processor"]


# -- media ----------------------------------------------------------------------------------------------------
def image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_video(path: Path, frames: int = 6, seed: int = 0) -> None:
    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
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
