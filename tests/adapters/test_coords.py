"""Grid coordinates of visual tokens: raster order per image, recovered from M-RoPE rows on Qwen."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch_for, tiny

import vtc
from vtc.adapters import adapter_for
from vtc.config import MethodConfig
from vtc.method import METHODS, LayerContext, Method, register_method
from vtc.state import TokenKind

# Families whose images are a base view and anyres tiles, each its own grid (not one square per image).
ANYRES = ("llava_next", "llava_onevision", "llava_next_video")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SpyConfig(MethodConfig):
    pass


class _Spy(Method):
    """Records the state a stage at the embeddings sees; keeps everything."""

    name = "coords_spy_test"
    config_cls = _SpyConfig
    seen: list = []  # noqa: RUF012  (a test probe)

    def prune_layers(self, num_layers):
        return (0,)

    def select(self, ctx: LayerContext):
        _Spy.seen.append(ctx.state)
        return None


@pytest.fixture(autouse=True)
def _spy():
    register_method(_Spy)
    _Spy.seen.clear()
    yield
    METHODS.unregister(_Spy.name)


def expected_grid(n_images: int, side: int) -> torch.Tensor:
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    per = torch.stack([torch.zeros_like(rows), torch.zeros_like(rows), rows, cols], dim=-1)
    return torch.cat([per + torch.tensor([i, 0, 0, 0]) for i in range(n_images)])


@pytest.mark.parametrize("how", ["forward", "generate"])
def test_images_are_raster_grids(family, how):
    model = tiny(family)
    images = [1, 2] if family == "llava" else [1, 1]
    inputs, _ = batch_for(model, family, images=images)
    with vtc.apply(model, "coords_spy_test"), torch.no_grad():
        if how == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    state = _Spy.seen[0]
    if family in ANYRES:  # tiles: each (image, crop) is its own raster grid; generate's layout is forward's
        adapter = adapter_for(model)
        assert torch.equal(state.layout.table, adapter.layout(state.visual, inputs).table)
        fields = [state.layout.FIELDS.index(f) for f in ("media", "frame", "crop", "row", "col")]
        for row in range(len(images)):
            patch = state.visual[row] & (state.layout.field("kind")[row] == TokenKind.PATCH)
            groups = state.layout.table[row][patch][:, fields]
            for key in groups[:, :3].unique(dim=0):
                cells = groups[(groups[:, :3] == key).all(-1), 3:]
                cols = int(cells[:, 1].max()) + 1
                assert torch.equal(cells[:, 0] * cols + cells[:, 1], torch.arange(len(cells)))
        return
    for row, n in enumerate(images):
        got = state.coords[row][state.visual[row]]
        assert torch.equal(got, expected_grid(n, 16))
        assert (state.coords[row][~state.visual[row]] == -1).all()


def test_qwen_video_frames():
    from vtc.adapters.qwen2_vl import Qwen2VLAdapter as A

    model = tiny("qwen2_vl")
    grid = A.GRID
    n = 2 * (grid // 2) ** 2  # 4 frames -> 2 temporal patches of 16 x 16 tokens
    ids = torch.tensor([[5, A.START] + [A.VIDEO_TOKEN] * n + [A.END, 7, 8]])
    inputs = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == A.VIDEO_TOKEN).long() * 2,
        "pixel_values_videos": torch.randn(2 * grid * grid, 3 * A.TEMPORAL * A.PATCH**2),
        "video_grid_thw": torch.tensor([[2, grid, grid]]),
    }
    with vtc.apply(model, "coords_spy_test"), torch.no_grad():
        model(**inputs)
    got = _Spy.seen[0].coords[0][_Spy.seen[0].visual[0]]
    assert got[:, 1].unique().tolist() == [0, 1]  # two temporal positions
    assert torch.equal(got[got[:, 1] == 1][:, 2:], expected_grid(1, 16)[:, 2:])
