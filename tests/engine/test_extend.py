"""Extend forwards on a pruned cache: new tokens (a chat turn, a verify step, a later image) after a
pruned prefill compute what the unwrapped model computes with the dropped keys hidden, and a stage
acting in the extend prunes the new image under the same check (batch 2, left padding)."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, forward_inputs, tiny
from engine_fixtures import ColumnOracle, SeededKeep, SeededKeepConfig, decode_steps, hide_stages

import vtc
from vtc import surface
from vtc.adapters import ADAPTERS, adapter_for
from vtc.method import METHODS, register_method

FAMILIES = ["llava", "qwen2_vl"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_method(SeededKeep)
    yield
    METHODS.unregister(SeededKeep.name)


def chunk_of(
    model, family: str, batch: int, length: int, image: bool, seed: int, stray: dict | None = None
) -> dict[str, torch.Tensor]:
    """New tokens for every row: `length` text tokens, with one image in the middle when `image`.

    With `stray` (the prompt), every other text token is the image placeholder id but no pixels come
    with it, as when a decode step samples that id; Qwen gets the prompt's grids and text token types,
    as generate in transformers 5.17 passes them to every step."""
    g = torch.Generator().manual_seed(seed)
    cls = ADAPTERS.get(family)
    text = torch.randint(3, 100, (batch, length), generator=g)
    if stray is not None:
        text[:, ::2] = cls.IMAGE_TOKEN
        chunk = {"input_ids": text}
        if family != "llava":
            chunk["mm_token_type_ids"] = torch.zeros_like(text)
            chunk["image_grid_thw"] = stray["image_grid_thw"]
        return chunk
    if not image:
        chunk = {"input_ids": text}
    else:
        one = cls.make_samples(model, batch=1, seed=seed + 1, images=[1])[0]
        visual = adapter_for(model).visual_mask(one["input_ids"], None)[0]
        first, last = visual.nonzero().flatten()[[0, -1]].tolist()
        span = one["input_ids"][:, max(first - 1, 0) : last + 2].expand(batch, -1)  # Qwen's start/end marks too
        half = length // 2
        chunk = {"input_ids": torch.cat([text[:, :half], span, text[:, half:]], dim=1)}
        pixels = one["pixel_values"]
        chunk["pixel_values"] = torch.cat([pixels] * batch)
        if "image_grid_thw" in one:
            chunk["image_grid_thw"] = torch.cat([one["image_grid_thw"]] * batch)
    if family != "llava":
        chunk["mm_token_type_ids"] = (chunk["input_ids"] == cls.IMAGE_TOKEN).long()
    return chunk


def extend_inputs(model, family: str, prompt: dict, chunk: dict, cache) -> dict:
    """The chunk's forward arguments: the full mask, explicit positions, the cache."""
    width = chunk["input_ids"].shape[1]
    mask = torch.cat([prompt["attention_mask"], torch.ones_like(chunk["input_ids"])], dim=1)
    if family == "llava":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    else:
        full_ids = torch.cat([prompt["input_ids"], chunk["input_ids"]], dim=1)
        full_types = torch.cat([prompt["mm_token_type_ids"], chunk["mm_token_type_ids"]], dim=1)
        chunk_grids = chunk.get("image_grid_thw") if chunk["mm_token_type_ids"].any() else None
        grids = [g for g in (prompt.get("image_grid_thw"), chunk_grids) if g is not None]
        batch = full_ids.shape[0]
        # get_rope_index consumes grids in order of appearance: row 0's images, then row 1's.
        per_row = [torch.cat([g.view(batch, -1, 3)[b] for g in grids]) for b in range(batch)] if grids else None
        positions = surface.mrope_positions(
            adapter_for(model).vlm,
            full_ids,
            full_types,
            image_grid_thw=torch.cat(per_row) if per_row else None,
            attention_mask=mask,
        )[:, :, -width:]
    return {**chunk, "attention_mask": mask, "position_ids": positions, **surface.cache_kwargs(model, cache)}


def run(model, family: str, prompt: dict, chunk: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill, extend with `chunk`, three decode steps: (extend logits, decode tokens)."""
    fwd = forward_inputs(family, prompt)
    out = model(**fwd, use_cache=True)
    step = extend_inputs(model, family, prompt, chunk, surface.output_cache(out))
    out = model(**step, use_cache=True)
    positions = step["position_ids"]
    tokens = decode_steps(model, family, out, step["attention_mask"], positions, 3)
    return out.logits, tokens


def visual_columns(model, ids: torch.Tensor) -> list[torch.Tensor]:
    visual = adapter_for(model).visual_mask(ids, None)
    return [row.nonzero().flatten() for row in visual]


def check_against_oracle(family: str, length: int, image: bool, extend_stage: bool, stray: bool = False) -> None:
    model = tiny(family)
    prompt, _ = batch_for(model, family, images=[1, 1], batch=2)
    chunk = chunk_of(model, family, 2, length, image, seed=7, stray=prompt if stray else None)
    config = SeededKeepConfig(layers=(2,), extend=extend_stage)
    with vtc.apply(model, config) as handle, torch.no_grad():
        logits, tokens = run(model, family, prompt, chunk)
        stages = list(handle.stats.stages)
        assert handle.stats.extends == int(chunk["input_ids"].shape[1] > 1)  # one token is a decode step
    prefill = [s for s in stages if s.kind == "prefill"]
    extend = [s for s in stages if s.kind == "extend"]
    assert prefill and sum(len(k) for k in prefill[0].kept_visual) < sum(prefill[0].visual_before)
    assert bool(extend) == (image and extend_stage), "a stage acts in an extend only when asked and when it has images"
    oracle = ColumnOracle()
    hide_stages(oracle, prefill, visual_columns(model, prompt["input_ids"]), 0)
    if extend:
        assert sum(len(k) for k in extend[0].kept_visual) < sum(extend[0].visual_before)
        hide_stages(oracle, extend, visual_columns(model, chunk["input_ids"]), prompt["input_ids"].shape[1])
    oracle.install(model)
    try:
        with torch.no_grad():
            expected, expected_tokens = run(model, family, prompt, chunk)
    finally:
        oracle.uninstall(model)
    if not extend:  # every new token is still there: compare each position
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=2e-5)
    else:  # the extend's output is compacted; its last token (text) is always kept
        torch.testing.assert_close(logits[:, -1], expected[:, -1], atol=2e-5, rtol=2e-5)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("length", [1, 5, 64])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_extends_on_a_pruned_cache_equal_the_masked_oracle(family, length):
    check_against_oracle(family, length, image=False, extend_stage=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_extend_carrying_a_second_image_equals_the_masked_oracle(family):
    check_against_oracle(family, 6, image=True, extend_stage=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stage_pruning_the_new_image_of_an_extend_equals_the_masked_oracle(family):
    check_against_oracle(family, 6, image=True, extend_stage=True)


@pytest.mark.parametrize("length", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_ids_without_pixels_are_text(family, length):
    """A decode step or extend that carries the image placeholder id but no pixels: the model embeds the
    id as a token, and vtc must neither refuse it nor count it as visual."""
    check_against_oracle(family, length, image=False, extend_stage=True, stray=True)
