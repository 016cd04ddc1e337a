"""Long videos: KV-cache bytes, peak memory and prefill time of dense, VideoScan and ZipVL, side by side.

The model is a random LLaVA-OneVision with LLaVA-OneVision-0.5B's decoder layer shapes (Qwen2: width 896,
14 heads of 64, 2 KV heads, FFN 4864) at a CPU-sized depth and vocabulary (the KV cache does not depend on
either), and a small SigLIP tower whose
frames pool 2 x 2 to 4 tokens each (plus the video's newline token). Every (method, frames) pair runs in a
fresh Python process, so its peak resident memory is its own: the process resets its high-water mark
(``/proc/self/clear_refs``) after building the model and the input, then runs one prefill with a KV cache.
VideoScan scans the video frame by frame through ``vtc.stream`` (a plain forward stays dense under it);
the others run one forward. Printed per row: visual tokens in, tokens the cache holds per layer (mean),
KV-cache bytes, the ratio to dense at the same frame count, peak memory above the pre-prefill baseline,
and the prefill's wall time.
Rows go to benchmarks/results/video.csv with date, device and command.

    python benchmarks/bench_video.py                          # 16, 64, 256, 1024 frames; every method
    python benchmarks/bench_video.py --frames 16,64 --specs dense,videoscan
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: dense first: the other rows are read against it.
SPECS = ("dense", "videoscan", "zipvl", "zipvl.evict")
FRAMES = (16, 64, 256, 1024)
VOCAB = 16384  # OneVision's is 151936; only the embedding and LM head depend on it
VIDEO_TOKEN, IMAGE_TOKEN = VOCAB - 1, VOCAB - 2
TILE, PATCH = 32, 8  # 4 x 4 patches per frame, pooled to 2 x 2


def onevision_like(layers: int, seed: int = 0) -> torch.nn.Module:
    """A random LLaVA-OneVision with OneVision-0.5B's decoder layer shapes and `layers` layers."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        image_size=TILE, patch_size=PATCH, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=1, vision_use_head=False,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[TILE, TILE]], vision_feature_select_strategy="full", vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.eval()


def video_input(frames: int, question: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt: a short prefix, the video's placeholders (4 per frame, one newline), a question."""
    g = torch.Generator().manual_seed(seed)
    per_frame = (TILE // PATCH // 2) ** 2
    words = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    ids = [1, *words(12), *[VIDEO_TOKEN] * (frames * per_frame + 1), *words(question)]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values_videos": torch.randn(1, frames, 3, TILE, TILE, generator=g),
    }


def resident_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory needs Linux.")


def child(spec: str, frames: int, layers: int, threads: int) -> dict:
    """One prefill in this process, on `threads` torch threads; returns its row."""
    import vtc
    from vtc import surface
    from vtc.measure import kv_cache_bytes

    torch.set_num_threads(threads)
    model = onevision_like(layers)
    inputs = video_input(frames)
    handle = None if spec == "dense" else vtc.wrap(model, spec)
    scan = spec.split(".")[0] == "videoscan"  # a plain forward is dense under VideoScan: the stream scans
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from here
    base = resident_kib("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        if scan:
            stream = vtc.stream(handle)
            stream.push(inputs)
            cache = stream.cache
        else:
            cache = surface.output_cache(model(**inputs, use_cache=True, logits_to_keep=1))
    seconds = time.perf_counter() - start
    peak = resident_kib("VmHWM")
    lengths = surface.layer_lengths(cache)
    row = {
        "method": spec,
        "frames": frames,
        "visual_tokens": int((inputs["input_ids"] == VIDEO_TOKEN).sum()),
        "cached_tokens": sum(lengths) / len(lengths),
        "kv_mb": kv_cache_bytes(cache) / 2**20,
        "peak_mb": (peak - base) / 1024,
        "prefill_s": seconds,
    }
    if handle is not None:
        handle.remove()
    return row


def run_child(spec: str, frames: int, layers: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, str(frames), "--layers", str(layers), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{spec} at {frames} frames failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=",".join(SPECS), help="methods (dense first), comma-separated")
    parser.add_argument("--frames", default=",".join(map(str, FRAMES)), help="frame counts, comma-separated")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (OneVision-0.5B has 24)")
    parser.add_argument("--out", default=str(HERE / "results" / "video.csv"), help="CSV the rows are added to")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each measured process")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.layers, args.threads)))
        return 0

    from vtc.bench import format_rows
    from vtc.cli import append_rows, environment

    specs = [s for s in args.specs.split(",") if s]
    if specs[0] != "dense":
        specs.insert(0, "dense")
    rows = []
    for frames in (int(f) for f in args.frames.split(",")):
        dense = None
        for spec in specs:
            row = run_child(spec, frames, args.layers, args.threads)
            dense = dense or row
            row["kv_vs_dense"] = row["kv_mb"] / dense["kv_mb"]
            rows.append(row)
            print(f"{spec:>14} {frames:>5} frames: {row['kv_mb']:.1f} MB KV, {row['prefill_s']:.2f} s", flush=True)
    columns = [
        ("method", "method", "s"), ("frames", "frames", "d"), ("visual_tokens", "visual in", "d"),
        ("cached_tokens", "cached/layer", ".0f"), ("kv_mb", "KV MB", ".2f"), ("kv_vs_dense", "KV/dense", ".3f"),
        ("peak_mb", "peak MB", ".0f"), ("prefill_s", "prefill s", ".2f"),
    ]  # fmt: skip
    print(format_rows(rows, columns))
    command = "python benchmarks/bench_video.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {**environment(), "threads": str(args.threads), "command": command.strip()}  # the children's threads
    append_rows(Path(args.out), rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
