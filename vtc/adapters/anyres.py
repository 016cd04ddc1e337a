"""The anyres packing of LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video, as plain arithmetic.

These families run one tower pass over a downscaled base view of an image and one over each tile of a
grid that the image's aspect ratio picks (``image_grid_pinpoints``), drop the rows or columns of the tile
grid that only cover padding ("unpad"), may shrink what is left (OneVision's ``anyres_max_N``), and end
every grid row with an image-newline token. Videos run one pass per frame and pool each frame's grid.

The functions here compute, from an image's size (or from the packed features when ``generate`` encoded
the media before the loop), which tower patch every LLM token of an item stands for; the adapters turn
that into a ``vtc.state.VisualLayout``. Nothing here touches a model: the tests compare it with what
transformers' modeling code packs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from vtc.state import TokenKind

#: Columns of an item's per-token table (``ItemTokens.table``), the item-independent fields of a layout.
ITEM_FIELDS = ("frame", "crop", "row", "col", "kind")
#: Tower positions per LLM token: one patch, or the up to 2 x 2 taps of a bilinear resize or a pooling window.
TOWER_WIDTH = 4


def best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(height, width)`` among `pinpoints` an image of `size` ``(height, width)`` is resized into.

    The largest effective resolution (the image's pixels that survive the resize, never more than it has)
    wins; among equals the one that wastes the fewest pixels on padding, and the earlier one on a tie.
    """
    height, width = size
    best, best_effective, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (int(ph), int(pw)), effective, waste
    if best is None:
        raise ValueError(f"no image_grid_pinpoints fit an image of size {size}; the config lists {pinpoints}.")
    return best


def unpad_window(rows: int, cols: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, n_rows, left, n_cols)``: the part of a ``rows x cols`` patch grid that covers the image.

    The image of `size` ``(height, width)`` was resized to fit the grid and centred; the padding on both
    sides of the short dimension is cut, equally (an odd leftover patch stays).
    """
    height, width = size
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - 2 * pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - 2 * pad


def max_tiles(aspect: str | None) -> int | None:
    """N of OneVision's ``vision_aspect_ratio="anyres_max_N"``; None for plain anyres (LLaVA-NeXT)."""
    if not aspect:
        return None
    digits = aspect.rsplit("_", 1)[-1]
    if not aspect.startswith("anyres_max_") or not digits.isdigit():
        raise ValueError(f"vision_aspect_ratio {aspect!r} is not 'anyres_max_N'; set it as the checkpoint's config.")
    return int(digits)


def shrunk(rows: int, cols: int, side: int, limit: int | None) -> tuple[int, int] | None:
    """The grid OneVision resizes an unpadded ``rows x cols`` grid to (None: kept as it is).

    A grid more than 1.1 times (per side) larger than `limit` tiles is resized bilinearly to that area.
    """
    if limit is None:
        return None
    ratio = math.sqrt(rows * cols / (limit * side**2))
    if ratio <= 1.1:
        return None
    return int(rows // ratio), int(cols // ratio)


def bilinear_taps(n_in: int, n_out: int) -> tuple[list[list[int]], list[int], list[float]]:
    """Per output index of a 1-D bilinear resize (half-pixel centres, as ``F.interpolate`` without
    ``align_corners``): the input indices it reads with nonzero weight, the nearest of them, and the
    fractional source coordinate."""
    scale = n_in / n_out
    taps, nearest, source = [], [], []
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        low = min(int(src), n_in - 1)
        high = min(low + 1, n_in - 1)
        frac = src - low
        taps.append([low] if frac <= 0 or high == low else [low, high])
        nearest.append(high if frac > 0.5 else low)
        source.append(src)
    return taps, nearest, source


@dataclasses.dataclass(frozen=True)
class ImagePlan:
    """How one image is packed.

    Attributes:
        side: patches per side of one tower view.
        tiles: ``(rows, cols)`` of the tile grid; ``(0, 0)`` when only the base view is used.
        window: ``(top, rows, left, cols)`` of the unpadded part of the combined tile grid.
        out: the grid OneVision resized the unpadded part to, or None.
    """

    side: int
    tiles: tuple[int, int] = (0, 0)
    window: tuple[int, int, int, int] = (0, 0, 0, 0)
    out: tuple[int, int] | None = None

    @property
    def views(self) -> int:
        """Tower passes: the base view and each tile."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of the packed tile grid (before its newlines); ``(0, 0)`` without tiles."""
        if self.tiles == (0, 0):
            return 0, 0
        return self.out if self.out is not None else (self.window[1], self.window[3])

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid
        return self.side**2 + (rows * (cols + 1) if rows else 1)


def plan_image(
    size: Sequence[int], side: int, tile_pixels: int, pinpoints: Sequence[Sequence[int]], limit: int | None = None
) -> ImagePlan:
    """The packing of an image of `size` ``(height, width)`` (``image_sizes``), tiled over `pinpoints`."""
    height, width = (int(x) for x in size)
    ph, pw = best_resolution((height, width), pinpoints)
    tiles = (ph // tile_pixels, pw // tile_pixels)
    window = unpad_window(tiles[0] * side, tiles[1] * side, (height, width))
    return ImagePlan(side, tiles, window, shrunk(window[1], window[3], side, limit))


def plan_from_grid(
    rows: int, cols: int, side: int, tile_pixels: int, pinpoints: Sequence[Sequence[int]], limit: int | None = None
) -> ImagePlan:
    """The packing that gives a packed ``rows x cols`` tile grid, when only the features are known.

    ``generate`` encodes the images before its loop and does not pass ``image_sizes`` on; the packed
    features still show the grid (newline tokens end its rows). Among the tile grids and unpadded windows
    that give it, take the smallest tile grid (``best_resolution`` prefers it when the larger one only adds
    padding) and the widest window; without OneVision's resize this is exact.
    """
    grids = sorted({(p[0] // tile_pixels, p[1] // tile_pixels) for p in pinpoints}, key=lambda t: (t[0] * t[1], t))
    for th, tw in grids:
        full_r, full_c = th * side, tw * side
        windows = [(full_r, c) for c in range(full_c, 0, -1)] + [(r, full_c) for r in range(full_r - 1, 0, -1)]
        for wr, wc in windows:
            if (full_r - wr) % 2 or (full_c - wc) % 2:
                continue
            out = shrunk(wr, wc, side, limit)
            if (out or (wr, wc)) == (rows, cols):
                window = ((full_r - wr) // 2, wr, (full_c - wc) // 2, wc)
                return ImagePlan(side, (th, tw), window, out)
    raise ValueError(
        f"no tile grid of image_grid_pinpoints packs to {rows} x {cols} features; "
        f"pass image_sizes with the images (the processor's output) or features this model made."
    )


@dataclasses.dataclass(frozen=True)
class ItemTokens:
    """The LLM tokens of one image or video in packed order.

    Attributes:
        table: ``[n, len(ITEM_FIELDS)]`` frame, crop, row, col, kind of each token (-1 where none applies).
        tower: ``[n, TOWER_WIDTH]`` positions in the item's tower output sequence (its views one after the
            other, ``per_view`` tokens each), -1 padded.
        views: tower passes the item took.
    """

    table: torch.Tensor
    tower: torch.Tensor
    views: int

    def __len__(self) -> int:
        return self.table.shape[0]


def _tokens(rows: list[list[int]], towers: list[list[int]], views: int) -> ItemTokens:
    tower = torch.full((len(towers), TOWER_WIDTH), -1, dtype=torch.long)
    for i, taps in enumerate(towers):
        tower[i, : len(taps)] = torch.tensor(taps, dtype=torch.long)
    return ItemTokens(torch.tensor(rows, dtype=torch.long).reshape(-1, len(ITEM_FIELDS)), tower, views)


def image_tokens(plan: ImagePlan, per_view: int, first: int) -> ItemTokens:
    """The tokens of an image packed by `plan`.

    Args:
        plan: the packing.
        per_view: tokens of one tower view's output (patches, and CLS where the tower has one).
        first: position of the first patch in a view's output (1 after a CLS token, else 0).

    The base view comes first: crop -1, its own grid. Each cell of the packed tile grid then takes the tile
    (in raster order over the tile grid) of the patch it comes from, or after OneVision's resize the tile of
    its nearest source patch, with row and column counted from that tile's first cell in the packed grid.
    A newline ends each packed row (kind NEWLINE, crop -1, that row, no column, no tower patch); a base-only
    image has a single newline, at its last row.
    """
    side, patch = plan.side, int(TokenKind.PATCH)
    table, towers = [], []
    for r in range(side):
        for c in range(side):
            table.append([0, -1, r, c, patch])
            towers.append([first + r * side + c])
    rows, cols = plan.grid
    if not rows:
        table.append([0, -1, side - 1, -1, int(TokenKind.NEWLINE)])
        towers.append([])
        return _tokens(table, towers, plan.views)
    top, n_rows, left, n_cols = plan.window
    if plan.out is None:
        row_taps, row_near = [[i] for i in range(n_rows)], list(range(n_rows))
        col_taps, col_near = [[j] for j in range(n_cols)], list(range(n_cols))
    else:
        row_taps, row_near, _ = bilinear_taps(n_rows, rows)
        col_taps, col_near, _ = bilinear_taps(n_cols, cols)
    # Tile band of each packed row / column (by its nearest source), and where each band starts.
    row_band = [(top + r) // side for r in row_near]
    col_band = [(left + c) // side for c in col_near]
    row_start = {b: row_band.index(b) for b in set(row_band)}
    col_start = {b: col_band.index(b) for b in set(col_band)}
    tile_cols = plan.tiles[1]

    def tower_of(r: int, c: int) -> int:  # r, c in the unpadded window
        full_r, full_c = top + r, left + c
        tile = (full_r // side) * tile_cols + full_c // side
        return (1 + tile) * per_view + first + (full_r % side) * side + full_c % side

    for i in range(rows):
        for j in range(cols):
            crop = row_band[i] * tile_cols + col_band[j]
            table.append([0, crop, i - row_start[row_band[i]], j - col_start[col_band[j]], patch])
            towers.append([tower_of(r, c) for r in row_taps[i] for c in col_taps[j]])
        table.append([0, -1, i, -1, int(TokenKind.NEWLINE)])
        towers.append([])
    return _tokens(table, towers, plan.views)


def video_tokens(
    frames: int, side: int, pooled: int, per_view: int, first: int, *, bilinear: bool, newline: bool
) -> ItemTokens:
    """The tokens of a video of `frames` frames, each frame's ``side x side`` grid pooled to ``pooled x pooled``.

    Frame-major raster order; crop -1. `bilinear`: OneVision's bilinear resize (the taps it reads), else a
    ``side // pooled`` strided pooling window (LLaVA-NeXT-Video). `newline`: one newline ends the video
    (OneVision), at the last frame with no row or column.
    """
    if bilinear:
        taps, _, _ = bilinear_taps(side, pooled)
    else:
        stride = side // pooled
        taps = [[i * stride + k for k in range(stride)] for i in range(pooled)]
    table, towers = [], []
    for f in range(frames):
        for i in range(pooled):
            for j in range(pooled):
                table.append([f, -1, i, j, int(TokenKind.PATCH)])
                towers.append([f * per_view + first + r * side + c for r in taps[i] for c in taps[j]])
    if newline:
        table.append([frames - 1, -1, -1, -1, int(TokenKind.NEWLINE)])
        towers.append([])
    return _tokens(table, towers, frames)


def packed_grid(features: torch.Tensor, newline: torch.Tensor, side: int) -> tuple[int, int]:
    """``(rows, cols)`` of the tile grid in one image's packed features ``[n, D]``: the newline tokens (exact
    copies of the model's ``image_newline``) end its rows. ``(0, 0)``: the base view alone."""
    n = features.shape[0]
    if n == side * side + 1:
        return 0, 0
    marks = (features[side * side :] == newline.to(features)).all(dim=-1).nonzero().flatten()
    rows = len(marks)
    if rows == 0 or (n - side * side) % rows:
        raise ValueError(
            f"an image's {n} encoded features do not end their grid rows with the model's image_newline; "
            f"pass the pixel values (and image_sizes) instead of features made elsewhere."
        )
    return rows, (n - side * side) // rows - 1
