"""The invariants every registered method must keep on every adapter family (ARCHITECTURE.md section 7).

The matrix enumerates the registries: a new method or family is tested here without editing this file.
Each method must register a ``noop`` preset. Every other preset is a row of the matrix on LLaVA-1.5 (a
budget's arithmetic is the same on every family); every other family runs one preset of each method, on
images, and on videos where the family takes them (rows of different frame counts). Methods that
prune nothing (``Method.prunes`` false: attention edits, decoding methods) keep the dense counts, and a
decoding method may mask tokens out with -inf, so the logits checks ask for no NaN and some finite value.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES, batch_for, forward_inputs, generate, hook_ids, tiny

import vtc
from vtc import surface
from vtc.adapters import ADAPTERS
from vtc.engine import attention
from vtc.flops import planned_counts
from vtc.method import get_method

# Methods that run from their name alone (speculative decoding needs a draft model: tests/methods/test_specdec.py).
METHOD_NAMES = [m for m in vtc.list_methods() if not get_method(m).required_settings]
SPECS = [s for s in vtc.list_methods(presets=True) if "." in s and not s.endswith(".noop")]
# One pruning preset per method, for properties of the method's code rather than of a budget.
ONE_PER_METHOD = [f"{m}.{next(p for p in get_method(m).presets if p != 'noop')}" for m in METHOD_NAMES]
# Every preset on the first family; one per method, on images and on videos, on the others.
FULL_SWEEP = "llava"
CASES = [
    pytest.param(family, media, spec, id=f"{family}-{media}-{spec}")
    for family in FAMILIES
    for media in ADAPTERS.get(family).modalities & {"image", "video"}
    for spec in (SPECS if family == FULL_SWEEP and media == "image" else ONE_PER_METHOD)
    if media in get_method(spec.split(".")[0]).media
]
#: Frames per row of the video cases: enough tokens that every preset prunes (DART's r192 keeps 196).
FRAMES = [8, 10, 6]
#: Families that take equal frame counts get this many in every row (pooled frames hold fewer tokens), and
#: an image in some rows.
EQUAL_FRAMES = 16


def method_batch(model, family: str, method: str):
    """A two-row batch of the media `method` acts on (videos for a video-only method), or None after
    checking that the family refuses the method for want of that media (decided by capabilities)."""
    wanted = get_method(method.split(".")[0]).media
    if "image" in wanted:
        return batch_for(model, family)
    if not wanted & ADAPTERS.get(family).modalities:
        with pytest.raises(vtc.MissingCapabilityError, match="wrap a family that takes video"):
            vtc.wrap(model, method)
        return None
    return media_batch(model, family, "video")


def media_batch(model, family: str, media: str, rows: int = 2):
    """(padded batch, samples) of `rows` rows of different token counts, with images or with videos."""
    if media == "video":
        if ADAPTERS.get(family).equal_frames:  # one [videos, frames, ...] tensor: rows differ by an image
            return batch_for(model, family, images=[1, 0, 1][:rows], frames=[EQUAL_FRAMES] * rows, batch=rows)
        return batch_for(model, family, frames=FRAMES[:rows], batch=rows)
    images = [1, 1, 2] if family == FULL_SWEEP else [1, 1, 1]
    return batch_for(model, family, images=images[:rows] if rows > 2 else None, batch=rows)


def sane(logits: torch.Tensor) -> bool:
    """No NaN, and every row has a finite logit (DeCo masks non-candidates with -inf, as generate's warpers do)."""
    return not logits.isnan().any() and bool(torch.isfinite(logits).any(-1).all())


def visual_and_text(family: str, sample: dict) -> tuple[int, int]:
    """Visual and text tokens of a one-row sample."""
    adapter = ADAPTERS.get(family)(tiny(family))  # not installed: only reads the placeholder ids
    visual = int(adapter.visual_mask(sample["input_ids"], None).sum())
    return visual, sample["input_ids"].shape[1] - visual


def test_every_method_has_a_noop_preset():
    for name in METHOD_NAMES:
        assert "noop" in get_method(name).presets, f"{name} needs a 'noop' preset for the matrix"


@pytest.mark.parametrize("family,media,spec", CASES)
def test_forward_generate_and_declared_counts(family, media, spec):
    model = tiny(family)
    inputs, samples = media_batch(model, family, media)
    with vtc.apply(model, spec) as handle, torch.no_grad():
        out = model(**inputs)
        assert sane(out.logits)
        stats = handle.stats
        dims = handle.adapter.dims()
        for row, sample in enumerate(samples):
            n_visual, n_text = visual_and_text(family, sample)
            got = [layer[row] for layer in stats.tokens_per_layer]
            if handle.methods[0].fixed_counts:
                expected, dense = planned_counts(dims, handle.methods, n_visual, n_text)
                assert got == expected
                if handle.methods[0].prunes:
                    assert expected != dense, f"{spec} should prune the tiny model's {n_visual} visual tokens"
                else:
                    assert expected == dense
            else:  # thresholds: the counts are the input's; they can only fall, and text always stays
                assert got[0] <= n_visual + n_text and all(a >= b for a, b in itertools.pairwise(got))
                assert all(v[row] <= n_visual for v in stats.visual_per_layer)
                assert all(n - v[row] == n_text for n, v in zip(got, stats.visual_per_layer, strict=True))
        new = generate(model, inputs)
        assert new.shape == (len(samples), 6)
        assert handle.stats.decode_steps == 5


@pytest.mark.parametrize("family,media,spec", CASES)
def test_padded_batch_equals_rows_alone(family, media, spec):
    model = tiny(family)
    inputs, samples = media_batch(model, family, media, rows=3)
    with torch.no_grad():  # the unwrapped model agrees with itself, so any difference below is vtc's
        dense = model(**forward_inputs(family, inputs)).logits[:, -1]
        for row, sample in enumerate(samples):
            torch.testing.assert_close(dense[row], model(**sample).logits[0, -1], atol=1e-4, rtol=1e-4)
    with vtc.apply(model, spec) as handle, torch.no_grad():
        batched = model(**forward_inputs(family, inputs)).logits[:, -1]
        prunes = handle.methods[0].prunes
        kept = [k.clone() for k in handle.stats.kept_visual()] if prunes else []
        tokens = generate(model, inputs)
        for row, sample in enumerate(samples):
            alone = model(**sample).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, atol=1e-4, rtol=1e-4)
            if prunes:  # a row that keeps everything may run no stage alone (GemFilter skips its pre-pass)
                n_visual = visual_and_text(family, sample)[0]
                alone_kept = handle.stats.kept_visual()[0] if handle.stats.stages else torch.arange(n_visual)
                assert torch.equal(alone_kept, kept[row])
            assert torch.equal(generate(model, sample)[0], tokens[row])


def attention_implementations(model) -> list[str]:
    return [surface.attention_implementation(c) for c in (model.config.text_config, model.config.vision_config)]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_remove_restores_bit_identical_logits_and_leaves_no_hook(family, method):
    """After every preset remove() restores the model exactly; some preset changes the output (or the tokens)."""
    model = tiny(family)
    batch = method_batch(model, family, method)
    if batch is None:
        return
    inputs, _ = batch
    hooks_before = hook_ids(model)
    attn_before = attention_implementations(model)
    acted = []
    with torch.no_grad():
        base = model(**inputs).logits
        base_tokens = None
        for preset in [p for p in get_method(method).presets if p != "noop"]:
            handle = vtc.wrap(model, f"{method}.{preset}")
            assert hook_ids(model) != hooks_before
            out = model(**inputs).logits
            acted.append(out.shape != base.shape or not torch.equal(out, base))
            if not acted[-1]:  # decoding methods act after the prefill: compare the generated tokens
                handle.remove()
                base_tokens = generate(model, inputs) if base_tokens is None else base_tokens
                handle = vtc.wrap(model, f"{method}.{preset}")
                acted[-1] = not torch.equal(generate(model, inputs), base_tokens)
            handle.remove()
            assert torch.equal(model(**inputs).logits, base)
            assert hook_ids(model) == hooks_before
            assert attention_implementations(model) == attn_before
            handle.remove()  # a second call is harmless
    assert any(acted), f"no preset of {method} changed the tiny model's output"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_noop_preset_equals_baseline(family, method):
    model = tiny(family)
    batch = method_batch(model, family, method)
    if batch is None:
        return
    inputs, _ = batch
    with torch.no_grad():
        base = model(**inputs).logits
        base_tokens = generate(model, inputs)
        with vtc.apply(model, f"{method}.noop"):
            assert torch.equal(model(**inputs).logits, base)
            assert torch.equal(generate(model, inputs), base_tokens)


@pytest.mark.parametrize("spec", ONE_PER_METHOD)
def test_same_seed_same_tokens(family, spec):
    model = tiny(family)
    batch = method_batch(model, family, spec)
    if batch is None:
        return
    inputs, _ = batch
    with vtc.apply(model, spec), torch.no_grad():
        first = generate(model, inputs)
        torch.manual_seed(123)
        sampled = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True)
        assert torch.equal(generate(model, inputs), first)
        torch.manual_seed(123)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True), sampled)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_runs_in_bf16_and_fp32(family, method, dtype):
    model = tiny(family, dtype=dtype)
    batch = method_batch(model, family, method)
    if batch is None:
        return
    inputs, _ = batch
    with vtc.apply(model, method), torch.no_grad():
        out = model(**inputs).logits
        assert out.dtype == dtype and sane(out.float())
        assert generate(model, inputs, n=3).shape == (2, 3)


# A setting of each method that acts on the tiny random models: VAR's presets other than `demo` find no
# sink there, edit nothing, and so would prove nothing about where its eager maths runs.
ACTING = [{"var": "var.demo"}.get(s.split(".")[0], s) for s in ONE_PER_METHOD]


@pytest.mark.parametrize("spec", ACTING)
def test_no_eager_attention_matrix_is_formed(family, spec, monkeypatch):
    """Methods read attention through taps (attn_rows); the model keeps sdpa in every text and tower layer.

    Two eager paths are watched: transformers' own (refused outright) and vtc's edited attention, which
    only a layer a method edits may take (VAR's redistribution), and which such a method must take.
    """
    import sys

    model = tiny(family)
    batch = method_batch(model, family, spec)
    if batch is None:
        return
    inputs, _ = batch

    def refuse(*args, **kwargs):
        raise AssertionError(f"{spec} made the model run eager attention")

    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    for module in [m for m in modules if hasattr(m, "eager_attention_forward")]:
        monkeypatch.setattr(module, "eager_attention_forward", refuse)
    edited, vtc_eager = [], attention.edited_attention

    def watch(module, *args, **kwargs):
        edited.append(module)
        return vtc_eager(module, *args, **kwargs)

    monkeypatch.setattr(attention, "edited_attention", watch)
    with pytest.raises(AssertionError, match="eager"), torch.no_grad():  # the guard does catch eager attention
        tiny(family, attn="eager")(**inputs)
    with vtc.apply(model, spec) as handle, torch.no_grad():
        model(**inputs)
        generate(model, inputs, n=2)
        assert surface.attention_implementation(model.config.text_config) in ("sdpa", "vtc_sdpa")
        layers = handle.adapter.layers
        edits = [i for m in handle.methods for i in m.edit_layers(len(layers))]
    in_edited_layers = {id(m) for i in edits for m in layers[i].modules()}
    outside = sorted({type(m).__name__ for m in edited if id(m) not in in_edited_layers})
    assert not outside, f"{spec} ran eager attention in layers it does not edit ({outside})"
    assert bool(edited) == bool(edits), f"{spec} edits layers {edits} but vtc's edited attention ran {len(edited)}x"
