"""ZipVL: the important share against eager attention, sparse prefill and evict mode against masked
oracles, the packed cache's bytes and the values decoding reads, rows of a batch, and refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import batch_for, forward_inputs, generate, tiny

import vtc
from vtc import surface
from vtc.engine import MixedKV, kv_nbytes
from vtc.errors import MethodConflictError
from vtc.methods.zipvl import ZipVLConfig, important_tokens, probe_rows, sparse_attention


def test_probe_rows_are_the_recent_share_and_a_seeded_draw_that_ignores_padding():
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :10] = False  # left padding: 30 tokens
    rows, row_valid = probe_rows(valid, 0.05, 0.05, seed=0)
    first = rows[0][row_valid[0]]
    assert first[-2:].tolist() == [38, 39] and first.numel() == 4 and bool((first[:2] < 38).all())
    alone, _ = probe_rows(torch.ones(1, 30, dtype=torch.bool), 0.05, 0.05, seed=0)
    assert torch.equal(rows[1][row_valid[1]], alone[0] + 10)  # the padded row draws what it draws alone
    other, _ = probe_rows(torch.ones(1, 30, dtype=torch.bool), 0.05, 0.05, seed=1)
    assert other[0, -2:].tolist() == [28, 29]


def test_the_important_count_is_the_fewest_tokens_holding_tau_of_the_mass():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 50, generator=g) ** 4
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[2, :7] = False
    counts = []
    for tau in (0.5, 0.9, 0.975):
        chosen = important_tokens(scores, valid, tau)
        assert not bool((chosen & ~valid).any()) and bool(chosen[:, -1].all())  # the last token always stays
        for b in range(3):
            mass = scores[b][valid[b]].sort(descending=True).values
            p = int(chosen[b].sum())
            assert mass[:p].sum() >= tau * mass.sum() > mass[: p - 1].sum()
            n = int(valid[b].sum())
            normalised = scores[b][valid[b]] / torch.arange(n, 0, -1)
            normalised[-1] = float("inf")
            top = normalised.argsort(descending=True, stable=True)[:p].sort().values
            assert torch.equal(chosen[b][valid[b]].nonzero().flatten(), top)
        counts.append(chosen.sum(dim=1))
    assert all(bool((a <= b).all()) for a, b in itertools.pairwise(counts))  # monotone in tau
    assert torch.equal(important_tokens(scores, valid, 1.0), valid)


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "float", "padding"])
def test_sparse_attention_equals_an_explicit_masked_computation(mask_kind):
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, n, d = 2, 4, 2, 12, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hkv, hkv))
    valid = torch.ones(b, n, dtype=torch.bool)
    if mask_kind != "causal":
        valid[1, :3] = False
    important = (torch.rand(b, n, generator=g) < 0.5) & valid
    important[:, -1] = True
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :]  # [B, L, L]
    mask = {
        "causal": None,
        "bool": allowed[:, None],
        "float": torch.zeros(b, 1, n, n).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min),
        "padding": valid.long(),
    }[mask_kind]
    out = sparse_attention(q, k, v, mask, important, scaling=d**-0.5)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    keep = allowed & important[:, :, None] & important[:, None, :]  # [B, L, L]
    scores = (q @ kk.transpose(-1, -2) * d**-0.5).masked_fill(~keep[:, None], float("-inf"))
    expected = (scores.softmax(-1).nan_to_num(0.0) @ vv).transpose(1, 2)  # [B, L, Hq, D]
    torch.testing.assert_close(out, expected)
    assert bool((out[~important] == 0).all())


def eager_ratios(family: str, sample: dict, config: ZipVLConfig) -> dict[int, torch.Tensor]:
    """Each layer's important set computed from the eager twin's full attention matrices."""
    with torch.no_grad():
        attentions = tiny(family, attn="eager")(**sample, output_attentions=True).attentions
    n = attentions[0].shape[-1]
    valid = torch.ones(1, n, dtype=torch.bool)
    rows, _ = probe_rows(valid, config.probe_recent, config.probe_random, config.seed)
    out = {}
    for j, a in enumerate(attentions):
        scores = a[0][:, rows[0], :].mean(dim=0).sum(dim=0)  # heads averaged, probe rows summed: [L]
        out[j] = important_tokens(scores[None], valid, config.tau)[0]
    return out


@pytest.mark.parametrize(("family", "media"), [("llava", "image"), ("qwen2_vl", "video")])
def test_important_sets_match_the_eager_twins_attention(family, media):
    # A dense prefill (the cache alone is compressed), so every layer's attention is the dense model's.
    config = ZipVLConfig(tau=0.9, sparse_prefill=False)
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1, frames=[8] if media == "video" else None)
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**samples[0])
        got = {j: imp[0] for j, (imp, _) in handle.methods[0].important.items()}
    expected = eager_ratios(family, samples[0], config)
    assert sorted(got) == sorted(expected)
    for j in expected:
        assert torch.equal(got[j], expected[j]), f"layer {j}"
    assert len({int(e.sum()) for e in expected.values()}) > 1 or family == "llava"  # shares differ by layer


def step_inputs(inputs: dict, token: torch.Tensor) -> dict:
    """One decode step's arguments after a prefill of `inputs`."""
    mask = inputs.get("attention_mask")
    step = {"input_ids": token[:, None]}
    if mask is not None:
        step["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return step


def dense_copy(cache, config) -> object:
    """A plain cache holding the values `cache`'s layers stand for (packed ones dequantized)."""
    out = surface.new_cache(config)
    for j in range(surface.num_cache_layers(cache)):
        keys, values = surface.layer_kv(cache, j)
        out.update(keys.clone(), values.clone(), j)
    return out


def test_the_packed_cache_holds_under_half_the_bytes_and_decoding_reads_its_values():
    family = "llava"
    model = tiny(family, dtype=torch.bfloat16)
    inputs, _ = batch_for(model, family)  # two rows, left padded
    inputs = forward_inputs(family, inputs)
    layers = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        with vtc.apply(model, "zipvl.t975") as handle:
            out = model(**inputs, use_cache=True)
            cache = surface.output_cache(out)
            token = out.logits[:, -1].argmax(-1)
            oracle = dense_copy(cache, model.config.text_config)
            important = {j: imp for j, (imp, _) in handle.methods[0].important.items()}
            step = model(**step_inputs(inputs, token), **surface.cache_kwargs(model, cache)).logits[:, -1]
        with vtc.apply(model, ZipVLConfig(tau=0.975, high_bits=16, low_bits=16)):
            full = surface.output_cache(model(**inputs, use_cache=True))
            unquantized = model(**step_inputs(inputs, token), **surface.cache_kwargs(model, full)).logits[:, -1]
        # The unwrapped model, its cache holding the dequantized values: what decoding must have read.
        read = model(**step_inputs(inputs, token), **surface.cache_kwargs(model, oracle)).logits[:, -1]
    torch.testing.assert_close(step, read)
    assert not torch.equal(step, unquantized)  # the codes, not the original values, were read
    for j in range(layers):
        keys, _ = surface.layer_parts(cache, j)
        packed = keys[0]
        assert isinstance(packed, MixedKV) and torch.equal(packed.high, important[j])
        assert packed.parts[0].bits == 4 and packed.parts[1].bits == 2
    # Both caches hold the prompt and one decoded token: packed + dense against dense, in bf16.
    dense, held = kv_nbytes(full), kv_nbytes(cache)
    assert held == sum(surface.layer_nbytes(cache, j) for j in range(layers)) and held <= dense / 2
    assert kv_nbytes(oracle) == dense  # the same tokens, dense


def test_decoded_tokens_are_packed_every_n_steps():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava")
    with vtc.apply(model, ZipVLConfig(recompress_every=2)), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=1)
    keys, values = surface.layer_parts(surface.output_cache(out), 0)
    # Five decode forwards wrote five tokens: two packed pairs (at the high precision) and one still dense.
    assert [type(k).__name__ for k in keys] == ["MixedKV", "MixedKV", "MixedKV", "Tensor"]
    assert [k.length for k in keys[1:3]] == [2, 2] and keys[3].shape[2] == 1
    assert all(k.parts[0].bits == 4 and k.parts[1] is None for k in (*keys[1:3], *values[1:3]))


def test_evict_mode_equals_an_explicit_masked_oracle():
    family = "llava"
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1)
    sample = samples[0]
    with torch.no_grad():
        with vtc.apply(model, "zipvl.evict") as handle:
            out = model(**sample, use_cache=True)
            cache = surface.output_cache(out)
            token = out.logits[:, -1].argmax(-1)
            important = {j: imp[0] for j, (imp, _) in handle.methods[0].important.items()}
            held = surface.layer_lengths(cache)
            n = sample["input_ids"].shape[1]
            position = torch.tensor([[n]])  # the next position (layer 0's cache length is smaller now)
            step = model(input_ids=token[:, None], position_ids=position, **surface.cache_kwargs(model, cache))
        # The same sparse prefill with every token cached; then each layer keeps its important tokens.
        with vtc.apply(model, ZipVLConfig(mode="quant", high_bits=16, low_bits=16)):
            full = model(**sample, use_cache=True)
        torch.testing.assert_close(full.logits, out.logits, rtol=0, atol=0)
        dense = surface.output_cache(full)
        oracle = surface.new_cache(model.config.text_config)
        for j in range(len(held)):
            keys, values = surface.layer_kv(dense, j)
            slots = important[j].nonzero().flatten()
            oracle.update(keys[:, :, slots], values[:, :, slots], j)
        expected = model(input_ids=token[:, None], position_ids=position, **surface.cache_kwargs(model, oracle))
    assert held == [int(important[j].sum()) for j in range(len(held))] and min(held) < n
    torch.testing.assert_close(step.logits[:, -1], expected.logits[:, -1])


def test_video_rows_keep_different_counts_and_equal_their_runs_alone():
    # The matrix runs zipvl.t975 this way on every video family; here the evict mode on one.
    family, spec = "qwen2_5_vl", "zipvl.evict"
    model = tiny(family)
    inputs, samples = batch_for(model, family, frames=[8, 10])
    with vtc.apply(model, spec) as handle, torch.no_grad():
        batched = model(**inputs).logits[:, -1]
        counts = {j: imp.sum(dim=1) for j, (imp, _) in handle.methods[0].important.items()}
        tokens = generate(model, inputs, n=3)
        for row, sample in enumerate(samples):
            torch.testing.assert_close(model(**sample).logits[0, -1], batched[row], atol=1e-4, rtol=1e-4)
            alone = {j: int(imp.sum()) for j, (imp, _) in handle.methods[0].important.items()}
            assert alone == {j: int(c[row]) for j, c in counts.items()}
            assert torch.equal(generate(model, sample, n=3)[0], tokens[row])
    assert any(int(c[0]) != int(c[1]) for c in counts.values())


def test_composes_with_a_pruning_method():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava")
    with vtc.apply(model, ["dart.r64", "zipvl.evict"]) as handle, torch.no_grad():
        out = model(**inputs, use_cache=True)
        held = surface.layer_lengths(surface.output_cache(out))
        assert generate(model, inputs, n=3).shape == (2, 3)
        dart_tokens = max(max(n) for n in handle.stats.tokens_per_layer)
    assert torch.isfinite(out.logits).all() and max(held) < dart_tokens


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="tau"):
        ZipVLConfig(tau=0.0)
    with pytest.raises(ValueError, match="mode"):
        ZipVLConfig(mode="drop")
    with pytest.raises(ValueError, match="cannot exceed high_bits"):
        ZipVLConfig(high_bits=2, low_bits=4)
    with pytest.raises(ValueError, match="high_bits must be one of"):
        ZipVLConfig(high_bits=3)
    model = tiny("llava")
    with pytest.raises(ValueError, match="head dimension 16"):
        vtc.wrap(model, ZipVLConfig(group_size=6))
    with pytest.raises(MethodConflictError, match="attends"):
        vtc.wrap(model, ["var.demo", "zipvl"])
