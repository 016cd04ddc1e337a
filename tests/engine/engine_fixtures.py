"""Test methods and the masked oracle shared by the engine tests."""

from __future__ import annotations

import dataclasses

import torch

from vtc import surface
from vtc.config import MethodConfig
from vtc.method import HookPoint, LayerContext, Method


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeededKeepConfig(MethodConfig):
    layers: tuple[int, ...] = (2,)
    seed: int = 0
    extend: bool = True  # also prune the new tokens of extend forwards


class SeededKeep(Method):
    """Keeps a seeded subset of each row's visual tokens at its layers, in prefills and extends alike.

    Rows keep different counts (about half, two thirds, ... by row content), so batches need padding.
    """

    name = "seeded_keep_test"
    config_cls = SeededKeepConfig
    hooks = frozenset({HookPoint.LAYER})

    def __init__(self, config: SeededKeepConfig) -> None:
        super().__init__(config)
        self.extends = config.extend

    def prune_layers(self, num_layers):
        return tuple(self.config.layers)

    def select(self, ctx: LayerContext):
        state = ctx.state
        visual = state.visual & state.valid
        keep = torch.zeros_like(visual)
        for row in range(state.batch_size):
            pos = visual[row].nonzero().flatten()
            g = torch.Generator().manual_seed(self.config.seed + ctx.layer_idx + len(pos))
            n = len(pos) * (row + 1) // (row + 2)
            keep[row, pos[torch.randperm(len(pos), generator=g)[:n]]] = True
        return keep


class ColumnOracle:
    """Unwrapped-model attention that hides given key columns from given layers on.

    Columns are positions in the sequence of everything fed so far, the same in every layer of an
    unwrapped model's cache, so this is what a pruned cache must compute.
    """

    name = "vtc_test_column_oracle"

    def __init__(self) -> None:
        self.hidden: list[tuple[int, int, torch.Tensor, bool]] = []  # (from layer, row, columns, decode only)

    def hide(self, from_layer: int, row: int, columns: torch.Tensor, decode_only: bool = False) -> None:
        """Hide `columns` of batch row `row` from layer `from_layer` on (in one-token forwards only)."""
        self.hidden.append((from_layer, row, columns, decode_only))

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        eager = surface.attention_function("eager", module)
        mask = attention_mask.clone()
        floor = torch.finfo(mask.dtype).min
        for layer, row, columns, decode_only in self.hidden:
            if decode_only and query.shape[2] != 1:
                continue
            if module.layer_idx >= layer:
                mask[row, :, :, columns[columns < mask.shape[-1]]] = floor
        return eager(module, query, key, value, mask, **kwargs)

    def install(self, model) -> None:
        surface.register_attention(self.name, self, masks_like="eager")
        self._original = surface.attention_implementation(model.config.text_config)
        surface.set_attention_implementation(model.config.text_config, self.name)

    def uninstall(self, model) -> None:
        surface.set_attention_implementation(model.config.text_config, self._original)


def prefill_positions(model, family: str, inputs: dict) -> torch.Tensor:
    """The positions the prompt's tokens take (``[B, L]``, or M-RoPE's ``[3, B, L]`` for Qwen)."""
    from vtc.adapters import adapter_for

    return adapter_for(model).prompt_positions(inputs)


def greedy(model, family: str, inputs: dict, n: int, cache=None) -> tuple[torch.Tensor, object]:
    """Prefill `inputs` (with explicit positions) and `n` greedy decode steps: (tokens, the prefill's output)."""
    positions = prefill_positions(model, family, inputs)
    out = model(**inputs, position_ids=positions, use_cache=True, **surface.cache_kwargs(model, cache))
    return decode_steps(model, family, out, inputs["attention_mask"], positions, n), out


def hide_stages(oracle: ColumnOracle, stages, visual_columns: list[torch.Tensor], offset: int) -> None:
    """Hide what each stage dropped: visual input positions (plus `offset` columns) it did not keep."""
    present = [v.clone() for v in visual_columns]
    for stage in stages:
        for row, kept in enumerate(stage.kept_positions):
            dropped = present[row][~torch.isin(present[row], kept)]
            oracle.hide(stage.layer, row, dropped + offset)
            present[row] = kept


def decode_steps(model, family: str, out, mask: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """`n` greedy one-token steps after `out`, with explicit mask and positions; the tokens.

    The last step's output is left in ``decode_steps.last`` (its logits follow the last token).
    """
    tokens = []
    cache = surface.output_cache(out)
    for _ in range(n):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[..., -1:] + 1
        extra = {"mm_token_type_ids": torch.zeros_like(token)} if family != "llava" else {}
        out = model(
            input_ids=token, attention_mask=mask, position_ids=positions, **surface.cache_kwargs(model, cache), **extra
        )
        cache = surface.output_cache(out)
    decode_steps.last = out
    return torch.cat(tokens, dim=1)
