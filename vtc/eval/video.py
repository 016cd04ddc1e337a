"""Video frames for video QA: decord when installed, PyAV as the fallback.

Frames are sampled uniformly over the whole clip, ``linspace(0, total - 1, n)`` rounded down, which is
how lmms-eval samples Video-MME and MVBench for LLaVA. Its Qwen2-VL model class samples in two steps
instead: ``qwen_vl_utils`` first reads the clip at 2 frames per second, then ``linspace`` picks
``max_num_frames`` of those, so for Qwen the frames vtc picks can differ from lmms-eval's by a frame or
so. The frames reach Qwen's processor as arrays through ``videos=`` (``vtc.eval.qwen``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frame_indices(total: int, n: int) -> list[int]:
    """`n` frame indices spread uniformly over `total` frames (all of them when the clip is shorter)."""
    if total <= 0:
        raise ValueError("the video has no frames.")
    if n <= 0:
        raise ValueError(f"the frame count must be positive; got {n}.")
    if total <= n:
        return list(range(total))
    return np.linspace(0, total - 1, n, dtype=int).tolist()


def read_frames(path: str | Path, n: int, backend: str = "auto") -> np.ndarray:
    """``[n, H, W, 3]`` uint8 RGB frames of the video at `path`.

    Args:
        path: a video file.
        n: frames to sample.
        backend: ``"decord"``, ``"pyav"`` or ``"auto"`` (decord, else PyAV).

    Raises:
        FileNotFoundError: no such file.
        ImportError: neither reader is installed (``pip install 'vtc-vlm[video]'``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found.")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav'; got {backend!r}.")
    if backend in ("auto", "decord"):
        try:
            import decord
        except ImportError:
            if backend == "decord":
                raise
        else:
            reader = decord.VideoReader(str(path), num_threads=1)
            return reader.get_batch(frame_indices(len(reader), n)).asnumpy()
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading video needs decord or PyAV: pip install 'vtc-vlm[video]'.") from exc
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in frame_indices(len(frames), n)])
