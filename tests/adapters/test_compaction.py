"""Compaction against an independent oracle.

Dropping tokens at layer K must give the kept tokens exactly what they would compute if the dropped
tokens stayed in the sequence but were invisible as keys from layer K on: same original positions,
same causal order, same per-layer KV. The oracle runs the *unwrapped* model with an attention function
that masks the dropped keys; nothing of vtc's compaction code is involved in it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import batch_for, forward_inputs, generate, tiny

import vtc
from vtc import surface
from vtc.adapters import adapter_for
from vtc.config import MethodConfig
from vtc.method import METHODS, HookPoint, LayerContext, Method, register_method


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedKeepConfig(MethodConfig):
    layers: tuple[int, ...] = (2,)
    seed: int = 0
    trim_from: int | None = None


class FixedKeep(Method):
    """Test method: at each of its layers, keeps a seeded random subset of each row's visual tokens.

    Rows keep different counts (row r keeps about (r + 1) / (r + 3) of its tokens), so batches need padding.
    """

    name = "fixed_keep_test"
    config_cls = FixedKeepConfig
    hooks = frozenset({HookPoint.LAYER})

    def prune_layers(self, num_layers):
        return tuple(self.config.layers)

    def cache_trim_from(self, num_layers):
        return self.config.trim_from

    def select(self, ctx: LayerContext):
        state = ctx.state
        visual = state.visual & state.valid
        keep = torch.zeros_like(visual)
        for row in range(state.batch_size):
            pos = visual[row].nonzero().flatten()
            # Seeded by the row's own content so a row alone keeps the same tokens as in a batch.
            g = torch.Generator().manual_seed(self.config.seed + ctx.layer_idx + len(pos))
            n = len(pos) * (ctx.layer_idx % 3 + 1) // (ctx.layer_idx % 3 + 3)
            keep[row, pos[torch.randperm(len(pos), generator=g)[:n]]] = True
        return keep


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_method(FixedKeep)
    yield
    METHODS.unregister(FixedKeep.name)


class MaskedOracle:
    """Unwrapped-model attention that hides dropped input positions from layer K on.

    With `trim_from`, decode steps (one query) hide every dropped position from that layer on: the
    compacted model trimmed those layers' caches to the final tokens after the prefill.
    """

    name = "vtc_test_masked_oracle"

    def __init__(self, dropped_from: dict[int, list[torch.Tensor]], trim_from: int | None = None) -> None:
        self.dropped_from = dropped_from  # layer K -> per row, input positions dropped at K
        self.trim_from = trim_from

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        eager = surface.attention_function("eager", module)
        mask = attention_mask.clone()
        floor = torch.finfo(mask.dtype).min
        decode = query.shape[2] == 1
        for layer, rows in self.dropped_from.items():
            trimmed = decode and self.trim_from is not None and module.layer_idx >= self.trim_from
            if module.layer_idx >= layer or trimmed:
                for b, dropped in enumerate(rows):
                    mask[b, :, :, dropped] = floor
        return eager(module, query, key, value, mask, **kwargs)

    def install(self, model):
        surface.register_attention(self.name, self, masks_like="eager")
        self._original = surface.attention_implementation(model.config.text_config)
        surface.set_attention_implementation(model.config.text_config, self.name)

    def uninstall(self, model):
        surface.set_attention_implementation(model.config.text_config, self._original)


def dropped_positions(handle, inputs, family) -> dict[int, list[torch.Tensor]]:
    """Per stage layer, per row, the input positions the stage dropped (from handle.stats)."""
    from vtc.adapters import ADAPTERS

    visual = ADAPTERS.get(family)(handle.model).visual_mask(inputs["input_ids"], None)
    out: dict[int, list[torch.Tensor]] = {}
    present = [visual[b].nonzero().flatten() for b in range(visual.shape[0])]
    for stage in handle.stats.stages:
        rows = []
        for b, kept in enumerate(stage.kept_positions):
            rows.append(present[b][~torch.isin(present[b], kept)])
            present[b] = kept
        out[stage.layer] = rows
    return out


LAYER_SETS = [(2,), (0,), (1, 3)]


@pytest.mark.parametrize("layers", LAYER_SETS, ids=lambda x: "layers" + "-".join(map(str, x)))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compaction_matches_masked_oracle(family, layers, attn):
    model = tiny(family, attn=attn)
    inputs, _ = batch_for(model, family, images=[1, 0, 2] if family == "llava" else [1, 0, 1], batch=3)
    fwd_inputs = forward_inputs(family, inputs)
    with vtc.apply(model, FixedKeepConfig(layers=layers)) as handle, torch.no_grad():
        pruned = model(**fwd_inputs).logits[:, -1]
        kept_counts = [s.visual_after for s in handle.stats.stages]
        dropped = dropped_positions(handle, inputs, family)
        pruned_tokens = generate(model, inputs, n=8)
    assert any(len(set(c)) > 1 for c in kept_counts), "rows should keep different counts"
    assert sum(len(d) for rows in dropped.values() for d in rows) > 0

    oracle = MaskedOracle(dropped)
    oracle.install(model)
    try:
        with torch.no_grad():
            expected = model(**fwd_inputs).logits[:, -1]
            expected_tokens = generate(model, inputs, n=8)
    finally:
        oracle.uninstall(model)
    torch.testing.assert_close(pruned, expected, atol=2e-5, rtol=2e-5)
    assert torch.equal(pruned_tokens, expected_tokens)


def greedy_loop(model, sample: dict, n: int) -> torch.Tensor:
    """A user's decode loop: feeds back each token with the cache only (no positions, no mask)."""
    out = model(**sample, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(n - 1):
        extra = {"mm_token_type_ids": torch.zeros_like(tokens[-1])} if "mm_token_type_ids" in sample else {}
        out = model(
            input_ids=tokens[-1], **surface.cache_kwargs(model, surface.output_cache(out)), use_cache=True, **extra
        )
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)[0]


@pytest.mark.parametrize("layers,trim_from", [((1, 3), 1), ((2,), 0), ((1, 3), 2)])
def test_cache_trim_matches_oracle_and_shrinks_the_cache(family, layers, trim_from):
    model = tiny(family)
    inputs, _ = batch_for(model, family, images=[1, 0, 2] if family == "llava" else [1, 0, 1], batch=3)
    config = FixedKeepConfig(layers=layers, trim_from=trim_from)
    with vtc.apply(model, config) as handle, torch.no_grad():
        cache = surface.output_cache(model(**forward_inputs(family, inputs), use_cache=True))
        stats = handle.stats
        dropped = dropped_positions(handle, inputs, family)
        pruned_tokens = generate(model, inputs, n=6)
    final = stats.tokens_per_layer[-1]
    for i, layer in enumerate(cache.layers):
        want = final if i >= trim_from else stats.tokens_per_layer[i]
        assert stats.cache_tokens_per_layer[i] == want
        width = stats.seq_len_per_layer[-1 if i >= trim_from else i]  # padded tensor length
        assert layer.keys.shape[-2] == width
    oracle = MaskedOracle(dropped, trim_from)
    oracle.install(model)
    try:
        with torch.no_grad():
            expected_tokens = generate(model, inputs, n=6)
    finally:
        oracle.uninstall(model)
    assert torch.equal(pruned_tokens, expected_tokens)


def test_hand_written_decode_loop_without_positions(family):
    """A loop that passes only the cache decodes at the original positions, as generate does."""
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1)
    with torch.no_grad():
        assert torch.equal(greedy_loop(model, samples[0], 5), generate(model, samples[0], n=5)[0])
        with vtc.apply(model, FixedKeepConfig(layers=(2,))):
            assert torch.equal(greedy_loop(model, samples[0], 5), generate(model, samples[0], n=5)[0])


def test_beam_search_on_a_padded_batch_equals_rows_alone(family):
    """Beam search reorders the (per-layer, different-length) caches between steps."""
    model = tiny(family)
    inputs, samples = batch_for(model, family, images=[1, 0, 1], batch=3)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "num_beams": 3, "do_sample": False}
    with vtc.apply(model, FixedKeepConfig(layers=(1,))), torch.no_grad():
        batched = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]
        for row, sample in enumerate(samples):
            alone = model.generate(**sample, **kwargs)[0, sample["input_ids"].shape[1] :]
            assert torch.equal(batched[row], alone)


# Qwen's own forward fails on a hand-written decode step given a full-length 2-D mask and no positions
# (unwrapped too: its M-RoPE index then spans the whole mask), so the hand loop below runs on LLaVA.
@pytest.mark.parametrize("family", ["llava"])
def test_a_mask_hiding_prompt_tokens_in_decode_reaches_compacted_layers(family):
    """Decode steps honour the caller's mask over prompt columns in every layer (what Dropout Decoding does)."""
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1)
    sample = samples[0]
    visual = adapter_for(model).visual_mask(sample["input_ids"], None)[0]
    hidden_cols = visual.nonzero().flatten()[::2]  # hide every other visual token in the decode step
    with vtc.apply(model, FixedKeepConfig(layers=(0,))) as handle, torch.no_grad():
        out = model(**sample, use_cache=True)
        kept = handle.stats.stages[0].kept_positions[0]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([sample["attention_mask"], torch.ones_like(token)], dim=1)
        extra = {"mm_token_type_ids": torch.zeros_like(token)} if "mm_token_type_ids" in sample else {}

        def step(mask: torch.Tensor) -> torch.Tensor:
            cache = copy.deepcopy(surface.output_cache(out))
            out_step = model(
                input_ids=token, attention_mask=mask, **surface.cache_kwargs(model, cache), use_cache=True, **extra
            )
            return out_step.logits[0, -1]

        open_logits = step(mask)
        hidden = mask.clone()
        hidden[0, hidden_cols] = 0
        hidden_logits = step(hidden)
        only_dropped = mask.clone()
        only_dropped[0, hidden_cols[~torch.isin(hidden_cols, kept)]] = 0  # tokens vtc dropped anyway
        assert torch.equal(step(only_dropped), open_logits)
    assert not torch.allclose(hidden_logits, open_logits)


def test_a_deep_copied_cache_keeps_its_record_and_a_lost_record_is_refused(family):
    model = tiny(family)
    _, samples = batch_for(model, family, batch=1)
    sample = samples[0]
    with vtc.apply(model, FixedKeepConfig(layers=(2,))), torch.no_grad():
        out = model(**sample, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        extra = {"mm_token_type_ids": torch.zeros_like(token)} if "mm_token_type_ids" in sample else {}
        step = {"input_ids": token, "use_cache": True, **extra}
        copied = model(**step, **surface.cache_kwargs(model, copy.deepcopy(surface.output_cache(out)))).logits
        original = model(**step, **surface.cache_kwargs(model, surface.output_cache(out))).logits
        assert torch.equal(copied, original)
        stripped = copy.deepcopy(surface.output_cache(out))
        del stripped._vtc_record
        with pytest.raises(ValueError, match="carries no vtc record"):
            model(**step, **surface.cache_kwargs(model, stripped))


def test_per_layer_cache_lengths(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with vtc.apply(model, "dart.r64"), torch.no_grad():
        cache = surface.output_cache(model(**inputs, use_cache=True))
        lengths = surface.layer_lengths(cache)
    full = inputs["input_ids"].shape[1]
    assert lengths[:2] == [full, full]
    # Each row keeps its text and 68 visual tokens; rows pad to the longest (the row with the fewest visual).
    fewest = int(adapter_for(model).visual_mask(inputs["input_ids"], None).sum(1).min())
    assert lengths[2:] == [full - fewest + 68] * (len(lengths) - 2)


def test_static_cache_is_refused_with_the_fix(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with vtc.apply(model, "dart.r64"), pytest.raises(ValueError, match="DynamicCache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


# Qwen's own forward rejects a 4-D mask before vtc sees it (its M-RoPE index needs the 2-D one).
@pytest.mark.parametrize("family", ["llava"])
def test_custom_4d_mask_is_refused(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family, batch=1)
    length = inputs["input_ids"].shape[1]
    mask4d = torch.ones(1, 1, length, length, dtype=torch.bool).tril()
    with vtc.apply(model, "dart.r64"), pytest.raises(ValueError, match="2-D attention mask"):
        model(**{**inputs, "attention_mask": mask4d})
