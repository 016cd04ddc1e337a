"""DeCo: candidate sets, the adaptive preceding layer, and the invariants of the decoding rule."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, generate, tiny

import vtc
from vtc.methods.deco import candidates, mix


def test_candidates_are_the_nucleus_capped_by_top_k_and_hold_the_argmax():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.95, 0.02, 0.02, 0.01], [0.1, 0.2, 0.3, 0.4]])
    got = candidates(probs, top_p=0.9, top_k=2)
    assert got.tolist() == [[True, True, False, False], [True, False, False, False], [False, False, True, True]]
    assert candidates(probs, top_p=0.9, top_k=20)[0].tolist() == [True, True, True, False]
    assert candidates(probs, top_p=1.0, top_k=0).all()


def test_mix_uses_the_most_confident_layer_on_the_candidates():
    final = torch.tensor([[2.0, 1.9, -5.0, -5.0]])
    # layer 0 is confident about token 3 (not a candidate); layer 1 about candidate token 1
    early = torch.tensor([[[0.0, 0.0, 0.0, 9.0], [0.0, 4.0, 0.0, 0.0]]])
    out = mix(final, early, alpha=1.0, top_p=0.9, top_k=20)
    s = early[0, 1].softmax(-1)[1]
    torch.testing.assert_close(out[0, :2], final[0, :2] + s * early[0, 1, :2])
    assert torch.isinf(out[0, 2:]).all() and out[0].argmax() == 1  # the correction flips the choice
    confident = torch.tensor([[9.0, 0.0, 0.0, 0.0]])  # P(top1) >= 0.9: only the argmax is a candidate
    assert mix(confident, early, alpha=5.0, top_p=0.9, top_k=20)[0].argmax() == 0


@pytest.mark.parametrize("family", ["llava"])
def test_alpha_zero_is_vanilla_greedy_and_beam(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with torch.no_grad():
        base = generate(model, inputs)
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
        with vtc.apply(model, "deco", alpha=0.0) as handle:
            assert torch.equal(generate(model, inputs), base)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False), beams)
            assert handle.stats.extra_forwards == 0  # DeCo reads hidden states; it runs no extra forward
        with vtc.apply(model, "deco", alpha=3.0, top_p=1.0, top_k=0):
            assert not torch.equal(generate(model, inputs), base)


def test_composes_with_pruning_and_sampling_stays_in_the_candidates():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava")
    seen = []
    with vtc.apply(model, ["dart.r64", "deco"]) as handle, torch.no_grad():
        spy = handle.model.register_forward_hook(lambda m, a, o: seen.append(o.logits[:, -1].clone()))
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=0)
        spy.remove()
    new = out[:, inputs["input_ids"].shape[1] :]
    for step, logits in enumerate(seen):  # the emitted token is always a DeCo candidate
        assert torch.isfinite(logits.gather(1, new[:, step : step + 1])).all()
    assert handle.stats.stages, "dart still pruned"


def test_the_last_layer_cannot_be_a_preceding_layer():
    model = tiny("llava")
    with pytest.raises(ValueError, match="last layer"):
        vtc.wrap(model, "deco", layers=(1, 3))
    with pytest.raises(ValueError, match="first <= last"):
        vtc.resolve("deco", layers=(2, 1))
