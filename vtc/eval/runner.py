"""The eval runner: batched greedy generation over a task, one method at a time, resumable.

Every prediction is appended to ``<out>/<task>/<method>/predictions.jsonl`` as soon as its batch is
decoded, with what it cost (prefill FLOPs by the papers' formula, visual tokens kept, its share of the
batch's prefill and decode time). A run that stops (killed, out of memory) resumes where it stopped:
the docs already in the file are skipped, and a last line cut off mid-write is dropped. Scores and
the run's summary (``run.json``) are computed from the file alone, so a resumed run ends with the same
numbers as an uninterrupted one.

Prompts go through the processor's chat template when it has one, else LLaVA-1.5's conversation
format. Batches are left-padded, so with greedy decoding a batch gives each row the tokens that row
gets alone (the adapters keep this true for pruned models too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vtc.eval.data import load_images, locate_video
from vtc.eval.tasks import Task
from vtc.progress import bar as progress_bar

logger = logging.getLogger(__name__)

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
DENSE = "dense"


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"dense,dart.r64,sparsevlm.r128+dart"`` -> one label per run ("+" composes methods in one run)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s.strip()]


def method_dir(label: str) -> str:
    return label.replace("+", "__").replace("/", "_")


# -- prompts ---------------------------------------------------------------------------------------------------
def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _takes_video(processor: Any) -> bool:
    return getattr(processor, "video_processor", None) is not None and hasattr(processor, "video_token")


def build_prompt(processor: Any, text: str, n_images: int, video: bool = False) -> str:
    """The full prompt string: chat template when the processor has one, else LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        content: list[dict[str, Any]] = [{"type": "video"}] if video else [{"type": "image"}] * n_images
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", "<image>")
    images = "".join(f"{token}\n" for _ in range(n_images))
    return f"{LLAVA_SYSTEM} USER: {images}{text} ASSISTANT:"


def takes_video(model: torch.nn.Module, processor: Any) -> bool:
    """Whether `model` and `processor` take a video as a video (not as a row of images).

    The adapter's ``modalities`` says so for a family vtc adapts; for one whose adapter does not say (or
    with no adapter), a config with a video token and a processor with a video part do.
    """
    from vtc.adapters import adapter_class_for
    from vtc.errors import UnsupportedModelError

    try:
        modalities = getattr(adapter_class_for(model), "modalities", None)
    except UnsupportedModelError:
        modalities = None
    if modalities is None:
        config = model.config
        modalities = {"image", "video"} if _video_token(config) is not None else {"image"}
    return "video" in modalities and _takes_video(processor)


def _video_token(config: Any) -> int | None:
    for name in ("video_token_id", "video_token_index"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def check_modality(model: torch.nn.Module, processor: Any, task: Task, video_as_images: bool = False) -> None:
    """Refuse a video task for a model that takes images only, before any work, naming the two fixes.

    Raises:
        MissingCapabilityError: `task` is a video task, `model` takes no video and `video_as_images` is off.
    """
    if task.modality != "video" or video_as_images or takes_video(model, processor):
        return
    from vtc.errors import MissingCapabilityError

    family = getattr(model.config, "model_type", type(model).__name__)
    if _video_token(model.config) is not None:
        problem = f"its processor ({type(processor).__name__}) has no video part"
    else:
        problem = "the model takes images only"
    raise MissingCapabilityError(
        f"{task.name} is a video task, but {problem} ({family}). Evaluate a video model (Qwen2-VL, Qwen2.5-VL, "
        f"LLaVA-OneVision, LLaVA-NeXT-Video), or pass --video-as-images (video_as_images=True) to give it the "
        f"sampled frames as separate images, as lmms-eval does for LLaVA-1.5."
    )


def _checked(processor: Any, prompt: str, doc: dict[str, Any], n_images: int, n_videos: int) -> str:
    """`prompt`, after checking it holds one placeholder per image and per video of its doc.

    A chat template that writes placeholders of its own (or drops ours) would otherwise pair the wrong
    media with the wrong text, or fail deep inside the processor.
    """
    for kind, n in (("image", n_images), ("video", n_videos)):
        token = getattr(processor, f"{kind}_token", None) or (f"<{kind}>" if kind == "image" else None)
        if token is None:
            continue
        found = prompt.count(token)
        if found != n:
            raise ValueError(
                f"the prompt of doc {doc.get('_id')!r} holds {found} {token} placeholder(s) for {n} {kind}(s): the "
                f"processor's chat template writes {kind} placeholders of its own or drops them. Use the chat "
                f"template saved with the checkpoint, or one that writes one {token} per {{'type': '{kind}'}} item."
            )
    return prompt


def prepare(
    processor: Any,
    task: Task,
    docs: Sequence[dict[str, Any]],
    frames: int,
    *,
    fps: float | None = None,
    short_videos: str = "error",
    video_as_images: bool = False,
) -> Any:
    """Processor inputs of a batch of docs (left-padded tensors).

    A video task's clips are found by ``vtc.eval.data.locate_video`` and read with
    ``vtc.eval.video.read_frames`` (`frames`, `fps`, `short_videos`, the doc's window); they go to the
    processor as videos, or with `video_as_images` as one image per frame.
    """
    from vtc.eval.video import read_frames

    _tokenizer(processor).padding_side = "left"
    prompts, images, videos = [], [], []
    for doc in docs:
        text = task.text(doc)
        if task.modality == "video":
            path, window = locate_video(doc, task.visual)
            clip = read_frames(path, frames, fps=fps, short=short_videos, **window)
            if not video_as_images:
                videos.append(clip)
                prompts.append(_checked(processor, build_prompt(processor, text, 0, video=True), doc, 0, 1))
                continue
            from PIL import Image

            images.extend(Image.fromarray(f) for f in clip)  # an image model sees the frames as images
            prompts.append(_checked(processor, build_prompt(processor, text, len(clip)), doc, len(clip), 0))
        else:
            got = load_images(doc[task.visual], doc["_root"])
            images.extend(got)
            prompts.append(_checked(processor, build_prompt(processor, text, len(got)), doc, len(got), 0))
    kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return processor(**kwargs)


# -- predictions file --------------------------------------------------------------------------------------------
def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The records of a predictions file; a last line cut off mid-write is dropped (and removed from the file)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated")
            records.append(json.loads(line))
        except ValueError:
            logger.warning("%s: dropping a partly written last record; its doc runs again.", path)
            with path.open("r+b") as f:
                f.truncate(good)
            break
        good += len(line)
    return records


# -- timing ----------------------------------------------------------------------------------------------------
class _FirstToken:
    """A logits processor that notes when the prefill's logits arrive (the end of the prefill)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.at = device, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at = time.perf_counter()
        return scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the run -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _wrapped(model: torch.nn.Module, label: str) -> Iterator[Any]:
    if label == DENSE:
        yield None
        return
    import vtc

    with vtc.apply(model, label.split("+")) as handle:
        yield handle


def _dims(model: torch.nn.Module) -> Any:
    from vtc.adapters import adapter_for
    from vtc.errors import UnsupportedModelError

    try:
        adapter = adapter_for(model)
        return adapter, adapter.dims()
    except UnsupportedModelError:
        return None, None


def _placeholder_count(input_ids: torch.Tensor, config: Any) -> torch.Tensor:
    """Image and video placeholders per row, by the token ids a model's config names."""
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    ids = {getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)}
    return torch.isin(input_ids, torch.tensor(sorted(ids), device=input_ids.device)).sum(-1)


def _costs(inputs: Any, handle: Any, adapter: Any, dims: Any, config: Any = None) -> list[dict[str, float]]:
    """Per row: prefill FLOPs (compressed and dense, decoder layers) and visual tokens in / kept."""
    from vtc.flops import decoder_flops

    mask = inputs.get("attention_mask")
    n_rows = inputs["input_ids"].shape[0]
    lengths = mask.sum(-1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * n_rows
    if adapter is not None:
        visual = adapter.visual_mask(inputs["input_ids"], None).sum(-1).tolist()
    else:  # a family vtc does not adapt (yet): its placeholders, by the config's token ids
        visual = _placeholder_count(inputs["input_ids"], config).tolist() if config is not None else [0] * n_rows
    out = []
    for b in range(n_rows):
        row: dict[str, float] = {"visual_tokens": float(visual[b]), "visual_kept": float(visual[b])}
        if dims is not None:
            dense = sum(decoder_flops(dims, [int(lengths[b])] * dims.num_layers))
            counts = [int(lengths[b])] * dims.num_layers
            stats = handle.stats if handle is not None else None
            if stats is not None and stats.tokens_per_layer:
                counts = [layer[b] for layer in stats.tokens_per_layer]
                kept = [layer[b] for layer in stats.visual_per_layer]
                row["visual_kept"] = sum(kept) / len(kept)
            row.update(prefill_flops=sum(decoder_flops(dims, counts)), prefill_flops_dense=dense)
        out.append(row)
    return out


def run_task(
    model: torch.nn.Module,
    processor: Any,
    task: Task,
    docs: Sequence[dict[str, Any]],
    method: str,
    out_dir: str | Path,
    *,
    batch_size: int = 1,
    frames: int = 8,
    fps: float | None = None,
    short_videos: str = "error",
    video_as_images: bool = False,
    max_new_tokens: int | None = None,
    seed: int = 0,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) one task with one method and return the run's summary (also in ``run.json``).

    Args:
        model: a transformers vision-language model (evaluated as it is for ``"dense"``).
        processor: its processor (a tokenizer with an image processor, or a Qwen2-VL processor).
        task: the task.
        docs: its docs (``vtc.eval.data.load_docs``).
        method: ``"dense"`` or a method spec, several joined by ``+``.
        out_dir: the runs folder; this run writes ``<out_dir>/<task>/<method>/``.
        batch_size: rows per generate call.
        frames: frames sampled per video (with `fps`, the most frames taken).
        fps: sample videos at this many frames per second (``vtc.eval.video``); None: `frames` uniformly.
        short_videos: a clip shorter than `frames`: ``"error"`` (default), ``"all"`` (keep its frames) or
            ``"repeat"`` (repeat frames to fill `frames`).
        video_as_images: give an image-only model a video task's frames as separate images; without it
            such a run is refused before any work (``check_modality``).
        max_new_tokens: overrides the task's generation length.
        seed: set before every batch (greedy decoding does not use it; sampling methods do).
        model_name: recorded in the summary.
        progress: show a progress bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    check_modality(model, processor, task, video_as_images)
    run_dir = Path(out_dir) / task.name / method_dir(method)
    run_dir.mkdir(parents=True, exist_ok=True)
    pred_path = run_dir / "predictions.jsonl"
    done = {r["id"] for r in read_predictions(pred_path)}
    todo = [d for d in docs if d["_id"] not in done]
    device = next(model.parameters()).device
    adapter, dims = _dims(model)
    tok = _tokenizer(processor)
    peak = None
    bar = progress_bar(len(docs), f"{task.name} {method}", unit="q", enabled=progress, initial=len(docs) - len(todo))
    with _wrapped(model, method) as handle, pred_path.open("a", encoding="utf-8") as out:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            inputs = prepare(
                processor, task, batch, frames, fps=fps, short_videos=short_videos, video_as_images=video_as_images
            ).to(device)
            for key in ("pixel_values", "pixel_values_videos"):  # the processor's float32 -> the model's dtype
                if key in inputs and inputs[key].is_floating_point():
                    inputs[key] = inputs[key].to(model.dtype)
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock = _FirstToken(device)
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), _placeholders_explained(model, processor):
                generated = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens or task.max_new_tokens,
                    do_sample=False,
                    logits_processor=[clock],
                    pad_token_id=tok.pad_token_id,
                )
            _sync(device)
            t1 = time.perf_counter()
            if device.type == "cuda":
                peak = max(peak or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
            new = generated[:, inputs["input_ids"].shape[1] :]
            texts = tok.batch_decode(new, skip_special_tokens=True)
            costs = _costs(inputs, handle, adapter, dims, model.config)
            prefill_ms = ((clock.at or t1) - t0) * 1e3
            decode_ms = (t1 - (clock.at or t1)) * 1e3
            for doc, text, cost, ids in zip(batch, texts, costs, new, strict=True):
                record = {
                    "id": doc["_id"],
                    "prediction": text.strip(),
                    "target": task.target(doc),
                    **{k: doc.get(k) for k in task.record_keys},
                    **(task.extras(doc) if task.extras else {}),
                    **cost,
                    "new_tokens": int((ids != tok.pad_token_id).sum()) if tok.pad_token_id is not None else len(ids),
                    "prefill_ms": prefill_ms / len(batch),
                    "decode_ms": decode_ms / len(batch),
                    "batch_size": len(batch),
                }
                out.write(json.dumps(record, default=_jsonable) + "\n")
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
        bar.close()
        configs = [c.to_dict() for c in handle.configs] if handle is not None else []
    summary = summarize(task, pred_path, docs)
    summary.update(
        task=task.name,
        method=method,
        method_configs=configs,
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_type=getattr(model.config, "model_type", ""),
        dtype=str(model.dtype).replace("torch.", ""),
        batch_size=batch_size,
        frames=frames if task.modality == "video" else None,
        fps=fps if task.modality == "video" else None,
        video_as_images=video_as_images if task.modality == "video" else None,
        seed=seed,
        peak_memory_mb=peak,
        environment=environment(device),
    )
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
    return summary


@contextlib.contextmanager
def _placeholders_explained(model: torch.nn.Module, processor: Any) -> Iterator[None]:
    """Re-raise a forward's "features and tokens do not match" with what to check: the processor and the
    model disagree on how many placeholders an image or a clip's frames take."""
    from vtc import surface

    try:
        yield
    except ValueError as exc:
        if not surface.is_placeholder_mismatch(exc):
            raise
        family = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"{exc}. The processor ({type(processor).__name__}) wrote a different number of image / video "
            f"placeholders than the {family} model makes features: load the processor saved with this checkpoint, "
            f"or make its settings (patch_size, num_image_tokens, vision_feature_select_strategy, the video "
            f"processor's size) match the model's config."
        ) from exc


def summarize(task: Task, pred_path: Path, docs: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Scores and mean costs from a predictions file (only the `docs` given, when given)."""
    records = read_predictions(pred_path)
    if docs is not None:
        wanted = {d["_id"] for d in docs}
        records = [r for r in records if r["id"] in wanted]
    if not records:
        raise ValueError(f"{pred_path} holds no predictions to score.")
    n = len(records)
    eff: dict[str, Any] = {"samples": n}
    for key in ("prefill_ms", "decode_ms", "visual_tokens", "visual_kept", "new_tokens"):
        eff[key] = sum(r.get(key, 0.0) for r in records) / n
    if all("prefill_flops" in r for r in records):
        eff["prefill_flops"] = sum(r["prefill_flops"] for r in records) / n
        eff["prefill_flops_dense"] = sum(r["prefill_flops_dense"] for r in records) / n
        eff["flops_ratio"] = eff["prefill_flops"] / eff["prefill_flops_dense"] if eff["prefill_flops_dense"] else 1.0
    return {"metrics": task.score(records), "primary": task.primary, "efficiency": eff}


def environment(device: torch.device | None = None) -> dict[str, str]:
    import transformers

    import vtc

    name = torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else "cpu"
    return {
        "vtc": vtc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": name,
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
