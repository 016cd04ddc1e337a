"""GemFilter: the second pass is the model run on the selected tokens, and the scores are the paper's."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, forward_inputs, generate, text_inputs, tiny

import vtc
from vtc import surface
from vtc.adapters import ADAPTERS, adapter_for
from vtc.flops import ModelDims
from vtc.method import AttentionCall
from vtc.methods.gemfilter import GemFilter, GemFilterConfig, last_query_scores
from vtc.state import VisualTokenState


def run_directly(model, embeds: torch.Tensor, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unwrapped text model on `embeds` alone (positions 0..n-1), greedy: (first logits, tokens).

    EOS is suppressed, as ``generate(min_new_tokens=n)`` does.
    """
    adapter = adapter_for(model)
    lm, head = adapter.text_model, adapter.lm_head
    eos = model.generation_config.eos_token_id
    length = embeds.shape[1]

    def greedy(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(hidden[:, -1])
        return logits, logits.index_fill(-1, torch.tensor([eos]), float("-inf")).argmax(-1)

    with torch.no_grad():
        out = lm(inputs_embeds=embeds, position_ids=torch.arange(length)[None], use_cache=True)
        first, token = greedy(out.last_hidden_state)
        tokens, cache = [token], surface.output_cache(out)
        for t in range(n_new - 1):
            step = lm.embed_tokens(tokens[-1])[:, None]
            out = lm(inputs_embeds=step, position_ids=torch.tensor([[length + t]]), **surface.cache_kwargs(lm, cache))
            tokens.append(greedy(out.last_hidden_state)[1])
    return first[0], torch.stack(tokens, dim=1)[0]


@pytest.mark.parametrize("scope", ["all", "visual"])
def test_second_pass_equals_the_model_on_the_selected_tokens(family, scope):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=2)
    for sample in samples:
        embeds, _ = text_inputs(model, sample)
        with vtc.apply(model, "gemfilter", keep=40, scope=scope) as handle, torch.no_grad():
            logits = model(**sample).logits[0, -1]
            kept = handle.stats.stages[0].kept_tokens[0]
            tokens = generate(model, sample, n=5)[0]
        expected_logits, expected_tokens = run_directly(model, embeds[:, kept], n_new=5)
        torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=2e-5)
        assert torch.equal(tokens, expected_tokens)
        n_visual = int(adapter_for(model).visual_mask(sample["input_ids"], None).sum())
        assert len(kept) == sample["input_ids"].shape[1] - (n_visual - 40)


def test_scope_visual_keeps_all_text_and_scope_all_keeps_the_last_token(family):
    model = tiny(family)
    inputs, samples = batch_for(model, family)
    adapter = adapter_for(model)
    for scope in ("visual", "all"):
        with vtc.apply(model, "gemfilter", keep=16, scope=scope) as handle, torch.no_grad():
            model(**forward_inputs(family, inputs))
        for row, sample in enumerate(samples):
            pad = inputs["input_ids"].shape[1] - sample["input_ids"].shape[1]
            kept = handle.stats.stages[0].kept_tokens[row] - pad
            kept = kept[kept >= 0]
            text = (~adapter.visual_mask(sample["input_ids"], None)[0]).nonzero().flatten()
            assert kept[-1] == sample["input_ids"].shape[1] - 1
            if scope == "visual":
                assert torch.isin(text, kept).all()


def naive_scores(query: torch.Tensor, key: torch.Tensor, kernel: int) -> torch.Tensor:
    """The official scoring, literally: keys repeated per query head, raw logits summed, zero-padded pool."""
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)
    raw = (query[:, :, -1:] @ key.transpose(-1, -2))[:, :, 0].sum(dim=1)  # [B, L]
    out = torch.zeros_like(raw)
    for i in range(raw.shape[1]):
        window = [raw[:, j] if 0 <= j < raw.shape[1] else torch.zeros(raw.shape[0]) for j in range(i - 2, i + 3)]
        out[:, i] = sum(window) / kernel
    return out


def test_scores_are_the_papers_raw_logits_summed_and_pooled():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 6, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    visual = torch.zeros(2, 11, dtype=torch.bool)
    state = VisualTokenState.initial(visual, torch.ones_like(visual))
    scores = last_query_scores(AttentionCall(1, query, key, key, None, 8**-0.5, state), pool_kernel=5)
    torch.testing.assert_close(scores, naive_scores(query, key, 5), atol=1e-5, rtol=1e-5)


def test_selection_depends_only_on_layers_up_to_r():
    """Changing layer 3 (after r = 2) changes the pruned output but not the selection; changing layer 1 does."""
    cls = ADAPTERS.get("llava")
    models = [cls.tiny_model(seed=0) for _ in range(3)]
    with torch.no_grad():
        for model, layer in zip(models[1:], (3, 1), strict=True):
            for p in adapter_for(model).layers[layer].parameters():
                p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(layer)))
    sample = cls.make_samples(models[0], batch=1)[0]
    kept, logits = [], []
    for model in models:
        with vtc.apply(model, "gemfilter", keep=16, layer=2) as handle, torch.no_grad():
            logits.append(model(**sample).logits)
            kept.append(handle.stats.stages[0].kept_tokens[0])
    assert torch.equal(kept[0], kept[1])
    assert not torch.equal(logits[0], logits[1])  # both pruned the same way: layer 3 did change the output
    assert not torch.equal(kept[0], kept[2])  # a layer before r changes what is kept


def test_prepass_writes_no_cache_and_counts_in_flops(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family, batch=1)
    with vtc.apply(model, "gemfilter.r64") as handle, torch.no_grad():
        cache = surface.output_cache(model(**inputs, use_cache=True))
        stats = handle.stats
    full, kept = inputs["input_ids"].shape[1], stats.tokens_per_layer[0][0]
    n_visual = int(handle.adapter.visual_mask(inputs["input_ids"], None).sum())  # 256; anyres rows differ
    assert kept == full - (n_visual - 64)
    assert surface.layer_lengths(cache) == [kept] * 4
    assert stats.prepass_tokens_per_layer == [[full]] * 2  # layers 0..1 (r = floor(13/32 x 4) = 1) ran on everything
    dims = handle.adapter.dims()
    expected = 4 * dims.layer_macs(kept, kept) + 2 * dims.layer_macs(full, full)
    assert stats.flops.prefill == expected


def test_bad_settings():
    with pytest.raises(ValueError, match="odd"):
        GemFilterConfig(pool_kernel=4)
    with pytest.raises(ValueError, match="scope"):
        GemFilterConfig(scope="text")
    with pytest.raises(ValueError, match="only one of keep, keep_ratio"):
        GemFilterConfig(keep=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"use 0\.\.3"):
        vtc.wrap(tiny("llava"), "gemfilter", layer=7)


def test_stats_flops_compare_with_the_whole_prompt(family):
    """Dense FLOPs are the whole prompt's, not the filtered forward's; the pre-pass is counted as extra work."""
    model = tiny(family)
    inputs, _ = batch_for(model, family, batch=2)
    with torch.no_grad():
        with vtc.apply(model, "dart.noop") as handle:
            model(**forward_inputs(family, inputs))
            dense = handle.stats.flops
        with vtc.apply(model, vtc.resolve("gemfilter", keep=8)) as handle:
            model(**forward_inputs(family, inputs))
            filtered = handle.stats.flops
    assert filtered.per_layer_dense == dense.per_layer
    assert filtered.prefill < dense.prefill_dense


def test_default_scope_selects_visual_tokens_and_keeps_the_question(family):
    """The VLM adaptation is the default; the text-LLM paper's scope is the preset `gemfilter.literal`."""
    model = tiny(family)
    inputs, samples = batch_for(model, family, batch=1)
    text = ~adapter_for(model).visual_mask(samples[0]["input_ids"], None)[0]
    for spec, keeps_text in [("gemfilter", True), ("gemfilter.literal", False)]:
        with vtc.apply(model, spec, keep=16) as handle, torch.no_grad():
            model(**inputs)
        kept = torch.zeros_like(text)
        kept[handle.stats.stages[0].kept_tokens[0]] = True
        assert bool(kept[text].all()) == keeps_text, spec  # literal: some text scores below the image
        assert int(kept.sum()) == len(text) - (int((~text).sum()) - 16)  # both drop Nv - keep tokens
    assert vtc.resolve("gemfilter").scope == "visual" and vtc.resolve("gemfilter.literal").scope == "all"


def test_no_prepass_when_no_row_can_drop(family):
    """keep >= every row's visual tokens: neither the pre-pass nor the stage runs, and it is the model exactly."""
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with torch.no_grad():
        dense = model(**forward_inputs(family, inputs)).logits
        with vtc.apply(model, "gemfilter", keep=10_000) as handle:
            logits = model(**forward_inputs(family, inputs)).logits
            stats = handle.stats
    assert stats.prepass_tokens_per_layer == [] and stats.stages == []
    assert stats.flops.prefill_ratio == 1.0
    assert torch.equal(logits, dense)
    assert vtc.flops(model, vtc.resolve("gemfilter", keep=10_000), visual_tokens=256).prefill_ratio == 1.0


@pytest.mark.parametrize("num_layers,layer", [(4, 1), (28, 11), (32, 13)])
def test_default_layer_is_at_or_before_13_of_32_so_a_shallow_model_saves_flops(num_layers, layer):
    """The paper's depth fraction, rounded down: on 4 layers r = 1, and the demo's budgets cost less than dense."""
    dims = ModelDims("m", num_layers, 192, 512, 6, 2, 32, 64)
    assert GemFilter(vtc.resolve("gemfilter")).filter_layer(num_layers) == layer
    if num_layers == 4:  # the reference model's depth: 144 visual and 15 text tokens, 48 / 32 / 16 kept
        for keep in (48, 32, 16):
            assert (
                vtc.flops(dims, vtc.resolve("gemfilter", keep=keep), visual_tokens=144, text_tokens=15).prefill_ratio
                < 1
            )
