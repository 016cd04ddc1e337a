"""Prune the visual tokens of a video in Qwen2-VL: frames in, video tokens kept per frame out.

vtc treats a Qwen2-VL video (``pixel_values_videos`` + ``video_grid_thw``) like an image whose tokens
also carry a frame number, so pruning methods act on video tokens through the same ``vtc.wrap`` call.
The model here is a tiny random Qwen2-VL built from the config vtc's tests use (no checkpoint is
downloaded), so its answer is meaningless token ids: what the script shows is the plumbing and the
statistics. With a real checkpoint, its ``AutoProcessor`` makes these inputs from the frames and the
question; its video processor needs torchvision, so this script uses vtc's torchvision-free one
(``vtc.eval.qwen.FrameVideoProcessor``, what ``vtc eval`` falls back to), which makes the same layout.
Without ``--video`` a synthetic clip (a shape crossing a textured scene) is written with PyAV and read
back through ``vtc.eval.video.read_frames`` (decord or PyAV), as ``vtc eval`` reads clips.

    python examples/video_qa.py
    python examples/video_qa.py --video clip.mp4 --frames 16 --method random --keep 64
"""

import argparse
import dataclasses
import importlib.util
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vtc
from vtc.adapters.qwen2_vl import Qwen2VLAdapter as Qwen
from vtc.eval import shapesqa
from vtc.eval.qwen import FrameVideoProcessor
from vtc.eval.video import read_frames

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--video", type=Path, help="a video file (default: write a synthetic clip)")
parser.add_argument("--frames", type=int, default=8, help="frames sampled uniformly over the clip")
parser.add_argument("--size", type=int, default=96, help="frame side in pixels, a multiple of 16")
parser.add_argument("--method", default="dart")
parser.add_argument("--keep", type=int, default=48, help="video tokens to keep, over all frames")
args = parser.parse_args()
if args.size % 16:
    parser.error(f"--size must be a multiple of 16 (8-pixel patches merged 2 x 2); got {args.size}")


def synthetic_clip(path: Path | None) -> np.ndarray:
    """A ShapesQA scene whose first shape moves left to right; written to `path` with PyAV when given."""
    scene = shapesqa.sample_scene(random.Random(0))
    first = scene.objects[0]
    clip = [
        shapesqa.render(dataclasses.replace(scene, objects=(dataclasses.replace(first, x=x), *scene.objects[1:])))
        for x in np.linspace(first.size, scene.size - first.size, 16)
    ]
    if path is not None:
        import av

        with av.open(str(path), "w") as out:
            stream = out.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = scene.size, scene.size, "yuv420p"
            for image in clip:
                out.mux(stream.encode(av.VideoFrame.from_image(image)))
            out.mux(stream.encode())
    return np.stack([np.asarray(image) for image in clip])


if args.video is None and importlib.util.find_spec("av") is not None:
    args.video = Path("synthetic_clip.mp4")
    synthetic_clip(args.video)
if args.video is not None:
    frames = read_frames(args.video, args.frames)  # uniform over the clip, as vtc eval samples Video-MME
else:
    print("PyAV is not installed (pip install 'vtc-vlm[video]'): the synthetic clip stays in memory")
    frames = synthetic_clip(None)[:: max(1, 16 // args.frames)][: args.frames]
frames = np.stack([np.asarray(Image.fromarray(f).resize((args.size, args.size))) for f in frames])
print(f"{len(frames)} frames of {args.size}x{args.size} from {args.video or 'memory'}")

# What Qwen2-VL's video processor does (resize, CLIP normalisation, 2-frame patches in merge-window
# order), in vtc's torchvision-free version of it that `vtc eval` uses on Qwen checkpoints.
videos = FrameVideoProcessor(
    min_pixels=args.size**2, max_pixels=args.size**2, patch_size=Qwen.PATCH, temporal_patch_size=Qwen.TEMPORAL
)(frames, return_tensors="pt")
t, rows, cols = videos["video_grid_thw"][0].tolist()
m = 2  # the spatial merge
n_tokens = t * rows * cols // (m * m)

# Prompt ids: the tiny model has no tokenizer, so the question's words are stand-in ids.
ids = torch.tensor([[5, 6, Qwen.START] + [Qwen.VIDEO_TOKEN] * n_tokens + [Qwen.END, 7, 8, 9, 10]])
inputs = {
    "input_ids": ids,
    "attention_mask": torch.ones_like(ids),
    "mm_token_type_ids": (ids == Qwen.VIDEO_TOKEN).long() * 2,  # 2 marks video tokens
    **videos,
}
model = Qwen.tiny_model()
with vtc.apply(model, args.method, keep=args.keep) as handle, torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    stats = handle.stats
print("answer ids:", out[0, ids.shape[1] :].tolist())
print(f"video tokens: {n_tokens} ({t} temporal patches of {rows // m}x{cols // m}) -> {stats.visual_per_layer[-1][0]}")
per_frame = np.bincount(stats.kept_visual()[0].numpy() // (n_tokens // t), minlength=t)
print("kept per temporal patch:", per_frame.tolist())
print(stats)
