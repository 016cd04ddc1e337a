"""VAR: sink dimensions, the redistribution rule, and the identity when no sink is found."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, generate, tiny

import vtc
from vtc import surface
from vtc.adapters import adapter_for
from vtc.compose import Pipeline
from vtc.errors import MethodConflictError
from vtc.methods import var as var_module
from vtc.methods.var import VAR, find_sink_dims, redistribute


def test_find_sink_dims_returns_the_massive_dimensions():
    h = torch.randn(5, 4096)  # RMS-normalised values are at most sqrt(d): tau 20 needs a real width
    h[:, 7] = 1500.0
    h[:, 40] = -1200.0  # magnitude counts
    assert find_sink_dims(h, num=2, tau=20) == (7, 40)
    assert find_sink_dims(torch.randn(5, 4096), num=2, tau=20) == ()


def test_redistribution_keeps_row_sums_and_ratios():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 4, 10, generator=g).softmax(-1)
    image = torch.zeros(2, 10, dtype=torch.bool)
    image[:, 2:8] = True
    sink = torch.zeros(2, 10, dtype=torch.bool)
    sink[:, [0, 3]] = True  # a text sink (BOS) and a visual sink
    rows_ok = torch.ones(2, 4, dtype=torch.bool)
    rows_ok[1, :2] = False
    out = redistribute(probs, image, sink, rows_ok, p=0.6, rho=1.0, summ=0.0)
    torch.testing.assert_close(out.sum(-1), probs.sum(-1))
    changed = (out != probs).any(-1)
    assert changed[0].all() and not changed[1, :, :2].any()
    torch.testing.assert_close(out[..., [0, 3]][0], 0.6 * probs[..., [0, 3]][0])
    assert torch.equal(out[..., [1, 8, 9]], probs[..., [1, 8, 9]])  # text, not sinks
    others = [2, 4, 5, 6, 7]
    ratio = out[..., others] / probs[..., others]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    assert torch.equal(redistribute(probs, image, sink, rows_ok, p=1.0, rho=1.0, summ=0.0), probs)
    assert torch.equal(redistribute(probs, image, sink, rows_ok, p=0.6, rho=-1.0, summ=0.0), probs)


def test_no_sink_found_is_the_identity():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava")
    with torch.no_grad():
        base, tokens = model(**inputs).logits, generate(model, inputs)
        with vtc.apply(model, "var") as handle:
            assert torch.equal(model(**inputs).logits, base)
            assert torch.equal(generate(model, inputs), tokens)
            assert handle.methods[0].sink_dims == ()  # random weights have no massive activations


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_edited_rows_sum_to_one_and_rows_before_the_image_end_are_untouched(family, monkeypatch):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    seen = []

    def spy(probs, image, sink, rows_ok, **kw):
        out = redistribute(probs, image, sink, rows_ok, **kw)
        seen.append((probs, out, rows_ok))
        return out

    monkeypatch.setattr(var_module, "redistribute", spy)
    with vtc.apply(model, "var.demo") as handle, torch.no_grad():
        out = model(**inputs).logits
        generate(model, inputs, n=3)
        assert surface.attention_implementation(handle.adapter.text_config) == "vtc_sdpa"
    assert torch.isfinite(out).all() and len(seen) >= 2
    for probs, edited, rows_ok in seen:
        torch.testing.assert_close(edited.sum(-1), probs.sum(-1), atol=1e-5, rtol=1e-5)
        assert torch.equal(edited.transpose(1, 2)[~rows_ok], probs.transpose(1, 2)[~rows_ok])
    assert any(not torch.equal(a, b) for a, b, _ in seen[1:])  # decode steps are edited too


def test_two_edits_of_one_layer_and_an_edit_after_a_cache_trim_conflict():
    model = tiny("llava")
    adapter = adapter_for(model)

    class Other(VAR):
        name = "other_var"

    first, second = VAR(vtc.resolve("var")), Other(vtc.resolve("var"))
    for m in (first, second):
        m.bind(adapter)
    with pytest.raises(MethodConflictError, match="both edit"):
        Pipeline([first, second], adapter.num_layers)
    with pytest.raises(MethodConflictError, match="re-orders"):
        vtc.wrap(model, ["mustdrop.r64", "var"])


def test_checkpoint_dimensions_must_exist_in_the_model():
    with pytest.raises(ValueError, match="hidden size"):
        vtc.wrap(tiny("llava"), "var", sink_dims="llava-1.5-7b")
    with pytest.raises(ValueError, match="sink_dims"):
        vtc.resolve("var", sink_dims="llama-9")
