"""Answer ShapesQA rows with a (wrapped or plain) reference model; ``vtc.eval.shapesqa.score`` scores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vtc.reference.model import prompt


def batches(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def inputs_for(processor: Any, rows: list[dict], root: str | Path) -> dict[str, torch.Tensor]:
    """One left-padded batch: each row's image and its question in the LLaVA-1.5 prompt."""
    images = [Image.open(Path(root) / r["image"]).convert("RGB") for r in rows]
    return processor(images=images, text=[prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)


@torch.no_grad()
def predict(
    model: Any, processor: Any, rows: list[dict], root: str | Path, *, batch_size: int = 16, max_new_tokens: int = 40
) -> list[str]:
    """Greedy answers to ``rows`` (stock ``generate``, left padding), in order.

    40 new tokens hold the longest description (nine objects, 35 words and ``</s>``).
    """
    out = []
    for chunk in batches(rows, batch_size):
        inputs = inputs_for(processor, chunk, root)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]
