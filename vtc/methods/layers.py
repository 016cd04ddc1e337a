"""Which decoder layers a method acts on: a user's indices checked, or a paper's scaled to the model.

Papers state their layers for 32-layer LLaVA-1.5; vtc runs on other depths (Qwen2-VL's 28 layers, tiny
test models), so a paper's layer l becomes round(l x depth / 32) unless the user names layers.
"""

from __future__ import annotations


def output_layers(
    method: str, given: tuple[int, ...] | None, paper: tuple[int, ...], num_layers: int, paper_depth: int = 32
) -> tuple[int, ...]:
    """Layers whose outputs a method prunes: the user's, or the paper's scaled to this model's depth.

    Papers state layers for 32-layer LLaVA-1.5 (layer 2 of 32); another depth gets round(l x depth / 32),
    so one setting works on Qwen2-VL's 28 layers and on tiny test models. The last layer has no output to
    prune, so no layer may be the last.
    """
    if given is not None:
        layers = [resolve_layer(method, "layers", x, num_layers) for x in given]
    else:
        layers = [min(round(x * num_layers / paper_depth), num_layers - 2) for x in paper]
    layers = sorted(set(layers))
    if layers and layers[-1] >= num_layers - 1:
        raise ValueError(f"{method}: the last layer ({num_layers - 1}) has no output left to prune.")
    return tuple(layers)


def resolve_layer(method: str, name: str, layer: int, num_layers: int, lo: int = 0) -> int:
    """Map a possibly negative layer index onto ``[lo, num_layers)``, or raise naming the valid range."""
    resolved = layer + num_layers if layer < 0 else layer
    if not lo <= resolved < num_layers:
        raise ValueError(
            f"{method}: {name}={layer} is outside this model's decoder layers; use {lo}..{num_layers - 1} "
            f"(or a negative index from the end)."
        )
    return resolved
