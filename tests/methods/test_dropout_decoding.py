"""Dropout Decoding: the uncertainty decomposition, the masks, the vote, and vanilla when nothing drops."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, generate, tiny

import vtc
from vtc.adapters import adapter_for
from vtc.methods.dropout_decoding import uncertainty, vote


def test_aleatoric_plus_epistemic_is_the_entropy_of_the_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g) * 3
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False  # a row with fewer visual tokens
    a, e = uncertainty(logits, valid)
    assert (e >= 0).all() and (a[~valid] == 0).all() and (e[~valid] == 0).all()
    for b in range(2):
        p = logits[b, valid[b]].softmax(-1)
        mean = p.mean(0)
        entropy = -(mean * mean.log()).sum()
        n = valid[b].sum()
        torch.testing.assert_close(a[b].sum() / n + e[b].sum() / n, entropy, atol=1e-5, rtol=1e-5)


def test_vote_takes_the_majority_and_ties_go_to_the_earlier_member():
    tokens = torch.tensor([[5, 7, 7], [5, 7, 9], [4, 4, 4]])
    assert vote(tokens).tolist() == [1, 0, 0]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_nothing_dropped_is_vanilla_and_members_are_counted(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with torch.no_grad():
        base = generate(model, inputs)
        with vtc.apply(model, "dropout_decoding", member_probs=(0.0, 0.0), q_min=0.0) as handle:
            assert torch.equal(generate(model, inputs), base)
            assert handle.stats.extra_forwards == 2 * 5  # two members on each step after the first
            assert handle.stats.decode_steps == 5


def test_masks_hide_only_unprotected_visual_tokens_and_token_one_is_vanilla(monkeypatch):
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava")
    visual = adapter_for(model).visual_mask(inputs["input_ids"], None)
    with torch.no_grad():
        base = generate(model, inputs)
        with vtc.apply(model, "dropout_decoding", member_probs=(1.0,), q_min=1.0) as handle:
            masks = []
            run = handle.session.run_extra
            spy = lambda **kw: masks.append(kw["attention_mask"]) or run(**kw)  # noqa: E731
            monkeypatch.setattr(handle.session, "run_extra", spy)
            tokens = generate(model, inputs)
    assert torch.equal(tokens[:, 0], base[:, 0])  # the first token comes from the vanilla prefill
    assert len(masks) == 5
    for mask in masks:
        prompt = mask[:, : visual.shape[1]].bool()
        hidden = ~prompt & inputs["attention_mask"].bool()
        assert not (hidden & ~visual).any()  # only visual columns are ever hidden
        assert hidden.any()


def test_composes_with_pruning_and_runs_beam_search():
    model = tiny("llava")
    inputs, samples = batch_for(model, "llava")
    with vtc.apply(model, ["dart.r64", "dropout_decoding"]) as handle, torch.no_grad():
        tokens = generate(model, inputs, n=4)
        assert handle.stats.stages and handle.stats.extra_forwards == 3 * 3
        for row, sample in enumerate(samples):
            assert torch.equal(generate(model, sample, n=4)[0], tokens[row])
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
