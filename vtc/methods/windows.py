"""Window merges on a token grid: tokens of a window that are nearly identical become one token.

MustDrop merges 3 x 3 windows of similar patches (in the vision tower or on the LLM's visual tokens);
the training-free FocusLLaVA merges redundant 4 x 4 regions and 2 x 2 windows. Both score a window by
the mean pairwise cosine of its tokens and write the merged token into the window's last slot.
"""

from __future__ import annotations

import torch

from vtc.method import LayerContext, Selection


def merge_windows(
    feats: torch.Tensor, windows: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the windows whose tokens are nearly identical.

    Args:
        feats: ``[n, d]`` token features.
        windows: ``[W, w*w]`` token indices of each complete window, in raster order.
        threshold: merge when the mean cosine similarity over ordered pairs of distinct tokens is at least this.

    Returns:
        ``feats`` with each merged window's mean written into its last (bottom-right) token, ``[n]`` the
        tokens merged away (the window's other tokens), and ``[W]`` the windows' scores.
    """
    n_win, size = windows.shape
    if n_win == 0:
        return feats, torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device), feats.new_zeros(0)
    members = feats[windows].float()  # [W, w*w, d]
    unit = members / members.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    cos = unit @ unit.transpose(1, 2)  # [W, w*w, w*w]
    score = (cos.sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(dim=1)) / (size * (size - 1))
    merged = score >= threshold
    out = feats.clone()
    out[windows[merged, -1]] = members[merged].mean(dim=1).to(feats.dtype)  # plain mean: all sizes are 1
    gone = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    gone[windows[merged, :-1].flatten()] = True
    return out, gone, score


def grid_windows(rows: int, cols: int, side: int) -> torch.Tensor:
    """``[W, side*side]`` raster indices (into a rows x cols grid) of the complete side x side windows."""
    out = []
    for r0 in range(0, rows - side + 1, side):
        for c0 in range(0, cols - side + 1, side):
            out.append([(r0 + r) * cols + c0 + c for r in range(side) for c in range(side)])
    return torch.tensor(out, dtype=torch.long).reshape(-1, side * side)


def merge_grids(ctx: LayerContext, side: int, threshold: float) -> Selection:
    """Merge the side x side windows of every image (and frame) grid of a decoder layer's visual tokens.

    Windows come from the tokens' grid coordinates, so none spans two images; only complete windows of
    complete grids count.

    Returns:
        A visual-scope selection: merged windows' means written into their last slots, the rest dropped.
    """
    state = ctx.state
    hidden, keep = ctx.hidden.clone(), state.visual & state.valid
    for b in range(hidden.shape[0]):
        for members, rows, cols in list(state.grids(b, keep[b])):
            windows = members[grid_windows(rows, cols, side).to(members.device)]  # [W, side^2] slots of row b
            hidden[b], gone, _ = merge_windows(hidden[b], windows, threshold)
            keep[b] &= ~gone
    return Selection(keep, hidden=hidden)
