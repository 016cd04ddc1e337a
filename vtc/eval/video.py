"""Frames for video QA: decord when installed, PyAV as the fallback, or a folder of frame images.

Two ways to choose frames, both over the whole clip (or the ``start``..``end`` window a doc gives):

* **uniform** (the default): ``n`` frames at ``linspace(0, total - 1, n)`` rounded down, which is how
  lmms-eval samples Video-MME and MVBench for LLaVA-1.5, LLaVA-OneVision and LLaVA-NeXT-Video.
* **fps**: ``fps`` frames per second, as ``qwen_vl_utils`` (Qwen2-VL's reference loader, which
  lmms-eval's Qwen model classes call) does: ``duration * fps`` frames, at least 4 and at most
  ``max_frames`` and the clip's length, rounded down to an even count (Qwen's temporal patch
  holds two frames), placed at ``linspace(0, total - 1, count)`` rounded to the nearest frame.

decord and PyAV give the same frames of the same file: both count the frames the container lists,
and PyAV decodes in presentation order up to the last frame asked for, converting only those.

A clip shorter than the frames asked for is an error by default (``short="error"``), since a model
then sees fewer frames than the run says; ``short="all"`` keeps every frame the clip has (so rows
differ in frame count), ``short="repeat"`` repeats frames to fill the count (what lmms-eval's
``linspace`` does silently). Every other failure is a :class:`~vtc.errors.VideoError` (or a
``FileNotFoundError`` for a missing file) naming the file and what to check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vtc.errors import VideoError

BACKENDS = ("auto", "decord", "pyav")
#: What to do with a clip holding fewer frames than asked for (see the module docstring).
SHORT_POLICIES = ("error", "all", "repeat")
#: qwen_vl_utils' bounds for fps sampling: at least this many frames, counts a multiple of ``FRAME_FACTOR``.
FPS_MIN_FRAMES = 4
FRAME_FACTOR = 2
#: The frame rate assumed for a folder of frame images (MVBench ships TVQA's clips as frames at 3 fps).
FOLDER_FPS = 3.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# -- which frames ------------------------------------------------------------------------------------------------
def frame_indices(total: int, n: int, short: str = "all") -> list[int]:
    """`n` frame indices spread uniformly over `total` frames (``linspace`` rounded down).

    Args:
        total: frames in the clip (or window).
        n: frames wanted.
        short: for ``total < n``: ``"all"`` returns every frame, ``"repeat"`` repeats frames to give `n`,
            ``"error"`` raises (the caller names the file; see :func:`read_frames`).
    """
    if total <= 0:
        raise VideoError("the video has no frames.")
    if n <= 0:
        raise ValueError(f"the frame count must be positive; got {n}.")
    if short not in SHORT_POLICIES:
        raise ValueError(f"short must be one of {', '.join(SHORT_POLICIES)}; got {short!r}.")
    if total < n:
        if short == "error":
            raise VideoError(f"the video has {total} frames, fewer than the {n} asked for.")
        if short == "all":
            return list(range(total))
    return np.linspace(0, total - 1, n, dtype=int).tolist()


def fps_frame_count(total: int, native_fps: float, fps: float, max_frames: int) -> int:
    """How many frames fps sampling takes from a clip of `total` frames at `native_fps` (see the module docstring)."""
    if total <= 0:
        raise VideoError("the video has no frames.")
    if fps <= 0 or native_fps <= 0:
        raise ValueError(f"frame rates must be positive; got fps={fps}, the clip's {native_fps}.")
    lowest = -(-FPS_MIN_FRAMES // FRAME_FACTOR) * FRAME_FACTOR
    highest = max(max_frames // FRAME_FACTOR * FRAME_FACTOR, FRAME_FACTOR)
    wanted = min(max(total / native_fps * fps, lowest), highest, total)
    count = int(wanted // FRAME_FACTOR * FRAME_FACTOR)
    if count < FRAME_FACTOR:
        raise VideoError(f"the video has {total} frame(s); fps sampling needs at least {FRAME_FACTOR}.")
    return count


def fps_indices(total: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """The frames fps sampling picks: ``linspace(0, total - 1, count)`` rounded to the nearest frame."""
    count = fps_frame_count(total, native_fps, fps, max_frames)
    return np.round(np.linspace(0, total - 1, count)).astype(int).tolist()


# -- readers -----------------------------------------------------------------------------------------------------
class _Reader:
    """An open video: its frame count, its frame rate, and frames by index (``[k, H, W, 3]`` uint8)."""

    total: int
    fps: float

    def get(self, indices: Sequence[int]) -> np.ndarray:
        raise NotImplementedError


class _Decord(_Reader):
    def __init__(self, path: Path) -> None:
        import decord

        self.reader = decord.VideoReader(str(path), num_threads=1)
        self.total, self.fps = len(self.reader), float(self.reader.get_avg_fps() or 0.0)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self.reader.get_batch(list(indices)).asnumpy()


class _PyAV(_Reader):
    def __init__(self, path: Path) -> None:
        import av

        self.path = path
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream (an audio-only file?).")
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            # the container's count, as decord reads it; without one, count the packets (no decoding)
            self.total = int(stream.frames) or sum(1 for p in container.demux(stream) if p.size)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        import av

        wanted = sorted(set(indices))
        got: dict[int, np.ndarray] = {}
        with av.open(str(self.path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
        if len(got) < len(wanted):
            raise VideoError(
                f"{self.path} ends after {len(got) and max(got) + 1} decodable frames, though its header lists "
                f"{self.total}: the file is truncated or corrupt; download it again."
            )
        return np.stack([got[i] for i in indices])


class _Folder(_Reader):
    """A folder of frame images in name order (numbers in names compare as numbers)."""

    def __init__(self, path: Path) -> None:
        def key(p: Path) -> list[Any]:
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]

        self.files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=key)
        self.total, self.fps = len(self.files), FOLDER_FPS

    def get(self, indices: Sequence[int]) -> np.ndarray:
        from PIL import Image

        return np.stack([np.asarray(Image.open(self.files[i]).convert("RGB")) for i in indices])


def open_video(path: str | Path, backend: str = "auto") -> _Reader:
    """Open `path` (a video file, or a folder of frame images) with `backend`.

    ``"auto"`` tries decord, then PyAV (also when decord is installed but cannot read the file).

    Raises:
        FileNotFoundError: no such file or folder.
        ImportError: neither reader is installed.
        VideoError: the file is not a readable video (the message names it and what to check).
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}.")
    if path.is_dir():
        return _Folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found.")
    if path.stat().st_size == 0:
        raise VideoError(f"video {path} is an empty file (0 bytes): download or copy it again.")
    readers = {"decord": _Decord, "pyav": _PyAV}
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    failures, missing = [], []
    for name in order:
        try:
            return readers[name](path)
        except ImportError:
            missing.append(name)
        except VideoError:
            raise
        except Exception as exc:  # decord raises RuntimeError / DECORDError, PyAV its FFmpegError subclasses
            failures.append(f"{name}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    if not failures:
        raise ImportError(f"reading video needs {' or '.join(missing)}: pip install 'vtc-vlm[video]'.")
    raise VideoError(
        f"cannot read video {path} ({'; '.join(failures)}). Check that it is a complete, playable video file "
        f"(a partial download or a renamed non-video file reads like this): play it, or re-encode it with "
        f"`ffmpeg -i {path.name} -c:v libx264 fixed.mp4`."
    )


def read_frames(
    path: str | Path,
    n: int = 8,
    backend: str = "auto",
    *,
    fps: float | None = None,
    short: str = "error",
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """``[k, H, W, 3]`` uint8 RGB frames of the video (or frame folder) at `path`.

    Args:
        path: a video file, or a folder of frame images.
        n: frames to sample uniformly; with `fps`, the most frames to take.
        backend: ``"decord"``, ``"pyav"`` or ``"auto"`` (decord, else PyAV).
        fps: sample this many frames per second instead (see the module docstring); None: uniform.
        short: a clip with fewer frames than `n`: ``"error"``, ``"all"`` or ``"repeat"``.
        start / end: seconds; sample only this window of the clip (MVBench's bounded subtasks).

    Raises:
        FileNotFoundError: no such file.
        ImportError: neither reader is installed (``pip install 'vtc-vlm[video]'``).
        VideoError: the file is unreadable, holds no frames, or fewer than asked with ``short="error"``.
    """
    if short not in SHORT_POLICIES:
        raise ValueError(f"short must be one of {', '.join(SHORT_POLICIES)}; got {short!r}.")
    reader = open_video(path, backend)
    first, last = 0, reader.total - 1
    if (start is not None or end is not None) and reader.fps > 0:
        first = max(0, round((start or 0.0) * reader.fps))
        last = min(last, round(end * reader.fps)) if end is not None else last
    total = last - first + 1
    if reader.total <= 0 or total <= 0:
        window = f" between {start}s and {end}s" if reader.total > 0 else ""
        raise VideoError(f"video {path} has no frames{window}: check the file (and the doc's start / end).")
    try:
        if fps is not None:
            picked = fps_indices(total, reader.fps or FOLDER_FPS, fps, n)
        else:
            picked = frame_indices(total, n, short)
    except VideoError as exc:
        if fps is not None:
            fix = "sample it uniformly instead (leave out --fps)"
        else:
            fix = (
                f"ask for at most {total} frames (--frames {total}), or pass --short-videos all (keep the frames "
                f"it has) or --short-videos repeat (repeat frames to fill {n})"
            )
        raise VideoError(f"video {path}: {exc} To go on, {fix}.") from None
    try:
        return reader.get([first + i for i in picked])
    except (VideoError, ImportError):
        raise
    except Exception as exc:  # a frame the reader could list but not decode
        raise VideoError(
            f"cannot decode frames of video {path} ({type(exc).__name__}: {str(exc).strip()[:200]}): the file is "
            f"probably truncated or corrupt; download it again or re-encode it with ffmpeg."
        ) from None
