"""LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video: the visual layout is what the model packs.

The projector's output (or, for NeXT-Video's pooled frames, the resampler's input) is replaced by tags that
encode each tower patch (image or video, view or frame, row and column), and the image-newline parameter by
a sentinel; the merged embeddings the text backbone receives then show where every placeholder's feature
came from, and each layout field is checked against them. Placeholder counts are checked against the
processors' own formulas, and the layout from encoded features (``generate``'s path) against the one from
``image_sizes``.
"""

from __future__ import annotations

import math
import re
import types

import pytest
import torch
from conftest import batch_for, text_inputs, tiny
from torch.utils.flop_counter import FlopCounterMode
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from vtc.adapters import ADAPTERS, adapter_for, anyres
from vtc.errors import UnsupportedModelError
from vtc.state import TokenKind

FAMILIES = ["llava_next", "llava_onevision", "llava_next_video"]
VIDEO_FAMILIES = ["llava_onevision", "llava_next_video"]
NEWLINE = -5.0  # the sentinel image_newline


def geometry(model) -> tuple[int, int, int]:
    """(patches per side, tokens per tower view, position of a view's first patch)."""
    adapter = adapter_for(model)
    return adapter.vision_grid, adapter._per_view, adapter._first


class Tagged:
    """Replace the features of `model` by tags while in the block: ``tag(passes, side) -> [P, S, C]``."""

    def __init__(self, model, images: list[tuple[int, tuple[int, int]]] | None = None, videos: int = 0):
        self.model, self.images, self.videos = model, images, videos
        self.hooks = []

    def image_tags(self, passes: int, side: int) -> torch.Tensor:
        """Image i, view v: (i, is_base, row, col, 1); a tile's row / col are in the combined tile grid."""
        tags = torch.zeros(passes, side * side, 6)
        r, c = torch.arange(side * side) // side, torch.arange(side * side) % side
        p = 0
        for i, (views, (_, tile_cols)) in enumerate(self.images):
            for v in range(views):
                base = v == 0
                tr, tc = divmod(v - 1, tile_cols) if not base else (0, 0)
                tags[p, :, 0], tags[p, :, 1] = i, float(base)
                tags[p, :, 2], tags[p, :, 3] = tr * side + r, tc * side + c
                tags[p, :, 4] = 1
                p += 1
        assert p == passes, "the model ran a different number of tower passes than the test expects"
        return tags

    def video_tags(self, passes: int, side: int) -> torch.Tensor:
        """Video v, frame f: (v, f, row, col, 1)."""
        frames = passes // self.videos
        tags = torch.zeros(passes, side * side, 6)
        tags[:, :, 0] = (torch.arange(passes) // frames)[:, None]
        tags[:, :, 1] = (torch.arange(passes) % frames)[:, None]
        tags[:, :, 2], tags[:, :, 3] = torch.arange(side * side) // side, torch.arange(side * side) % side
        tags[:, :, 4] = 1
        return tags

    def __enter__(self):
        vlm, side = self.model.model, geometry(self.model)[0]
        width = vlm.language_model.config.hidden_size
        resampler = getattr(vlm, "vision_resampler", None)

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, n - t.shape[-1]))

        def project(module, args, output):
            if resampler is not None and self.videos:  # NeXT-Video: tags went in before the pooling
                return pad(args[0], width)
            make = self.image_tags if self.images is not None else self.video_tags
            return pad(make(output.shape[0], side), width).to(output)

        def pool(module, args):
            return (pad(self.video_tags(args[0].shape[0], side), args[0].shape[-1]).to(args[0]),)

        self.hooks.append(vlm.multi_modal_projector.register_forward_hook(project))
        if resampler is not None and self.videos:
            self.hooks.append(resampler.register_forward_pre_hook(pool))
        self.saved = vlm.image_newline.data.clone()
        vlm.image_newline.data.fill_(NEWLINE)
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.model.model.image_newline.data.copy_(self.saved)


def decode_taps(tower: torch.Tensor, side: int, per_view: int, first: int) -> tuple[list, list, list]:
    """Tower positions -> (views, rows, cols) within the view."""
    taps = [int(t) for t in tower if t >= 0]
    views = [t // per_view for t in taps]
    patch = [t % per_view - first for t in taps]
    return views, [p // side for p in patch], [p % side for p in patch]


def covers(taps: list[int], value: float) -> bool:
    """The taps are exactly the grid lines either side of an interpolated coordinate."""
    return sorted(set(taps)) == sorted({math.floor(value + 1e-4), math.ceil(value - 1e-4)})


def image_plans(model, sample) -> list[tuple[int, tuple[int, int]]]:
    """Per image, (tower views, tile grid) by transformers' own helpers."""
    c = model.config
    per_row = sample.get("batch_num_images")
    alone = [n == 1 for n in per_row.tolist() for _ in range(n)] if per_row is not None else None
    alone = alone or [True] * len(sample["image_sizes"])
    out = []
    for size, one in zip(sample["image_sizes"].tolist(), alone, strict=True):
        if not one:
            out.append((1, (0, 1)))
            continue
        views = image_size_to_num_patches(size, c.image_grid_pinpoints, c.vision_config.image_size)
        out.append((views, get_anyres_image_grid_shape(size, c.image_grid_pinpoints, c.vision_config.image_size)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("images", [[1], [2]])
def test_image_layout_is_what_the_model_packs(family, images):
    model = tiny(family)
    adapter = adapter_for(model)
    side, per_view, first = geometry(model)
    _, (sample,) = batch_for(model, family, images=images, batch=1, seed=len(images))
    with Tagged(model, images=image_plans(model, sample)):
        embeds = text_inputs(model, sample)[0][0]
    visual = adapter.visual_mask(sample["input_ids"], None)
    layout = adapter.layout(visual, sample)
    pos = visual[0].nonzero().flatten()
    table = {name: layout.field(name)[0, pos] for name in layout.FIELDS}
    tower, e = layout.tower[0, pos], embeds[pos]
    newline = (e == NEWLINE).all(-1)
    assert torch.equal(newline, table["kind"] == TokenKind.NEWLINE)
    assert (table["modality"] == 0).all() and (table["frame"] == 0).all()
    resized = False
    for n in range(len(pos)):
        if newline[n]:
            assert table["crop"][n] == -1 and table["col"][n] == -1 and (tower[n] == -1).all()
            continue
        assert table["item"][n] == int(e[n, 0])
        views, rows, cols = decode_taps(tower[n], side, per_view, first)
        if e[n, 1] == 1:  # the base view
            assert table["crop"][n] == -1 and views == [0]
            assert (table["row"][n], table["col"][n]) == (int(e[n, 2]), int(e[n, 3])) == (rows[0], cols[0])
            continue
        tile_cols = image_plans(model, sample)[int(e[n, 0])][1][1]
        full_r = [(v - 1) // tile_cols * side + r for v, r in zip(views, rows, strict=True)]
        full_c = [(v - 1) % tile_cols * side + c for v, c in zip(views, cols, strict=True)]
        assert covers(full_r, float(e[n, 2])) and covers(full_c, float(e[n, 3])), (n, full_r, full_c, e[n, :4])
        resized |= len(views) > 1
        near_r, near_c = math.floor(float(e[n, 2]) + 0.5 - 1e-4), math.floor(float(e[n, 3]) + 0.5 - 1e-4)
        assert table["crop"][n] == near_r // side * tile_cols + near_c // side
    # Each image's packed grid: a newline ends each row; tile groups are full rectangles in raster order.
    for item in table["item"].unique().tolist():
        mine = (table["item"] == item).nonzero().flatten()
        grid_row = torch.cumsum(newline[mine].long(), 0) - newline[mine].long()  # packed row of each token
        tiles = mine[(table["crop"][mine] >= 0)]
        if not len(tiles):
            continue
        lines = mine[newline[mine]]
        assert torch.equal(table["row"][lines], torch.arange(len(lines)))
        for crop in table["crop"][tiles].unique().tolist():
            group = tiles[table["crop"][tiles] == crop]
            r, c = table["row"][group], table["col"][group]
            h, w = int(r.max()) + 1, int(c.max()) + 1
            assert len(group) == h * w and torch.equal(r * w + c, torch.arange(h * w)), (item, crop)
            offset = grid_row[(table["crop"][mine] == crop).nonzero().flatten()] - r
            assert (offset == offset[0]).all()
    if family == "llava_onevision" and images == [1]:
        assert resized, "the tiny OneVision sample should exercise anyres_max's resize"


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_layout_is_what_the_model_pools(family):
    model = tiny(family)
    adapter = adapter_for(model)
    side, per_view, first = geometry(model)
    (sample,) = ADAPTERS.get(family).make_samples(model, frames=[3], seed=1)
    with Tagged(model, videos=1):
        embeds = text_inputs(model, sample)[0][0]
    visual = adapter.visual_mask(sample["input_ids"], None)
    layout = adapter.layout(visual, sample)
    pos = visual[0].nonzero().flatten()
    table = {name: layout.field(name)[0, pos] for name in layout.FIELDS}
    tower, e = layout.tower[0, pos], embeds[pos]
    newline = (e == NEWLINE).all(-1)
    assert torch.equal(newline, table["kind"] == TokenKind.NEWLINE)
    assert int(newline.sum()) == (family == "llava_onevision")
    assert (table["modality"] == 1).all() and (table["crop"] == -1).all() and (table["item"] == 0).all()
    pooled = int(table["row"].max()) + 1
    for n in range(len(pos)):
        if newline[n]:
            assert table["frame"][n] == 2 and table["row"][n] == -1 and (tower[n] == -1).all()
            continue
        frames, rows, cols = decode_taps(tower[n], side, per_view, first)
        assert table["frame"][n] == int(e[n, 1]) and set(frames) == {int(e[n, 1])}
        j = n - int(e[n, 1]) * pooled * pooled
        assert (table["row"][n], table["col"][n]) == divmod(j, pooled)
        if family == "llava_next_video":  # average pooling: the window's mean
            assert sum(rows) / len(rows) == pytest.approx(float(e[n, 2]))
            assert sum(cols) / len(cols) == pytest.approx(float(e[n, 3]))
        else:
            assert covers(rows, float(e[n, 2])) and covers(cols, float(e[n, 3]))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_numbers_items_by_modality_and_media_by_row(family):
    model = tiny(family)
    adapter = adapter_for(model)
    video = family in VIDEO_FAMILIES
    images, frames = [2, 0, 1], ([2, 2, 0] if video else None)
    samples = ADAPTERS.get(family).make_samples(model, images=images, frames=frames)
    inputs = ADAPTERS.get(family).collate(model, samples)
    visual = adapter.visual_mask(inputs["input_ids"], None)
    layout = adapter.layout(visual, inputs)
    for b, sample in enumerate(samples):  # each row's layout is the row's own, items renumbered
        alone_visual = adapter.visual_mask(sample["input_ids"], None)
        alone = adapter.layout(alone_visual, sample)
        n = sample["input_ids"].shape[1]
        if alone is None:  # a row without media
            assert (layout.table[b] == -1).all() and (layout.tower[b] == -1).all()
            continue
        got, want = layout.table[b, -n:], alone.table[0]
        keep = [i for i, name in enumerate(layout.FIELDS) if name != "item"]
        assert torch.equal(got[:, keep], want[:, keep]) and torch.equal(layout.tower[b, -n:], alone.tower[0])
    item, modality, media = (layout.field(f) for f in ("item", "modality", "media"))
    assert item[modality == 0].unique().tolist() == [0, 1, 2]  # images 0, 1 in row 0, image 2 in row 2
    if video:
        assert item[modality == 1].unique().tolist() == [0, 1]
        assert media[0][visual[0]].unique().tolist() == [0, 1, 2]  # two images, then the video
    assert (layout.field("kind")[~visual] == -1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_from_encoded_features_equals_layout_from_sizes(family):
    """``generate`` encodes the media first and passes ``mm_encoder_outputs`` without ``image_sizes``."""
    model = tiny(family)
    adapter = adapter_for(model)
    frames = [2, 0, 2] if family in VIDEO_FAMILIES else None
    inputs, _ = batch_for(model, family, images=[1, 2, 1], batch=3) if frames is None else (None, None)
    if frames is not None:
        cls = ADAPTERS.get(family)
        inputs = cls.collate(model, cls.make_samples(model, images=[1, 2, 1], frames=frames))
    visual = adapter.visual_mask(inputs["input_ids"], None)
    expected = adapter.layout(visual, inputs)
    encoded = {}
    with torch.no_grad():
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        encoded["image"] = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], return_dict=True, **extra
        )
        if frames is not None:
            encoded["video"] = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
    got = adapter.layout(visual, {"input_ids": inputs["input_ids"], "mm_encoder_outputs": encoded})
    assert torch.equal(got.table, expected.table) and torch.equal(got.tower, expected.tower)
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: (
            seen.append(adapter.layout(visual, {**kw, "input_ids": a[0] if a else kw["input_ids"]}))
            if kw.get("mm_encoder_outputs")
            else None
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert seen and torch.equal(seen[0].table, expected.table)


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholders_that_do_not_fit_raise_with_the_fix(family):
    model = tiny(family)
    adapter = adapter_for(model)
    inputs, _ = batch_for(model, family, images=[1, 1])
    ids = inputs["input_ids"]
    image = model.config.image_token_id
    visual = adapter.visual_mask(ids, None)
    short = ids.clone()
    short[0, (short[0] == image).nonzero()[0]] = 5  # one placeholder fewer
    with pytest.raises(ValueError, match=r"placeholders but image_sizes describes .*processor made together"):
        adapter.layout(adapter.visual_mask(short, None), {**inputs, "input_ids": short})
    gap = ids.clone()
    first = int((gap[0] == image).nonzero()[0])
    gap[0, first - 1], gap[0, first + 10] = image, 5  # same count, text inside the run
    with pytest.raises(ValueError, match="not contiguous"):
        adapter.layout(adapter.visual_mask(gap, None), {**inputs, "input_ids": gap})
    swapped = {**inputs, "image_sizes": inputs["image_sizes"].flip(0)}  # row 0's count fits neither image
    with pytest.raises(ValueError, match=r"row 0 has \d+ image placeholders, which ends inside image"):
        adapter.layout(visual, swapped)
    with pytest.raises(ValueError, match="no image features"):
        adapter.layout(visual, {"input_ids": ids})


def test_unsupported_feature_strategy_is_refused():
    cls = ADAPTERS.get("llava_next")
    config = cls._tiny_config(1)
    config.vision_feature_select_strategy = "full"  # CLIP's CLS would break the square grid
    model = cls._model_cls()._from_config(config)
    with pytest.raises(UnsupportedModelError, match="'default' with CLIP"):
        adapter_for(model)


def next_processor(pinpoints, tile, patch, family):
    """A processor stand-in with the attributes its token-count formulas read (no tokenizer needed)."""
    proc = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        patch_size=patch,
        num_additional_image_tokens=1,
        num_image_tokens=(tile // patch) ** 2,
        vision_aspect_ratio="anyres_max_9",
    )
    cls = LlavaNextProcessor if family == "llava_next" else LlavaOnevisionProcessor
    proc._get_unpadded_features = types.MethodType(cls._get_unpadded_features, proc)
    return proc, cls


# The checkpoints' configs: LLaVA-NeXT (CLIP-L/336) and OneVision (SigLIP/384, anyres_max_9 up to 6 x 6 tiles).
NEXT = ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 14)
ONEVISION = ([[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)], 384, 14)
SIZES = [(h, w) for h in (90, 200, 336, 480, 500, 719, 1024) for w in (100, 250, 336, 640, 800, 1500)]


@pytest.mark.parametrize(("family", "config"), [("llava_next", NEXT), ("llava_onevision", ONEVISION)])
def test_counts_match_the_processor_and_the_features_path_inverts_them(family, config):
    pinpoints, tile, patch = config
    side = tile // patch
    proc, cls = next_processor(pinpoints, tile, patch, family)
    limit = 9 if family == "llava_onevision" else None
    for size in SIZES:
        assert anyres.best_resolution(size, pinpoints) == tuple(select_best_resolution(size, pinpoints))
        plan = anyres.plan_image(size, side, tile, pinpoints, limit)
        # LLaVA-NeXT's processor counts CLS in the base view, then drops it for the "default" strategy.
        expected = cls._get_number_of_features(proc, *size, tile, tile) - (family == "llava_next")
        assert plan.num_tokens == expected, size
        back = anyres.plan_from_grid(*plan.grid, side, tile, pinpoints, limit)
        assert back.grid == plan.grid
        if limit is None:  # without the resize the packed grid determines the packing
            assert back == plan, size


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_flops_count_every_frame(family):
    """Images are checked for every family in tests/test_flops.py; here a video's passes, one per frame."""
    model = tiny(family, attn="eager")
    adapter = adapter_for(model)
    (sample,) = ADAPTERS.get(family).make_samples(model, frames=[2], seed=3)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**sample)
    pattern = r"\.(vision_tower|multi_modal_projector|vision_resampler)$"
    tower = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if re.search(pattern, k))
    visual = adapter.visual_mask(sample["input_ids"], None)
    passes = adapter.image_token_counts(visual, adapter.layout(visual, sample))
    assert len(passes) == 2
    assert tower == pytest.approx(2 * sum(adapter.dims().vision.macs(n) for n in passes), rel=1e-6)
