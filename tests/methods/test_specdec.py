"""Speculative decoding: exactly the target's greedy output with every kind of draft, the sampling rule's
distribution, composition with pruning, and clear errors for drafts the target cannot verify."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch_for, tiny

import vtc
from vtc.adapters import ADAPTERS
from vtc.engine.cache import CacheView
from vtc.errors import MethodConflictError
from vtc.methods import drafts, specdec
from vtc.methods.draft_head import DraftHead
from vtc.methods.drafts import continuing, right_aligned
from vtc.methods.speculative import accept_greedy, accept_sampling, warp

FAMILIES = ["llava", "qwen2_vl"]
GREEDY = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
_DRAFTS: dict = {}


def text_lm(vocab: int = 128, seed: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def head_for(family: str, seed: int = 5) -> DraftHead:
    """A randomly initialised draft head built from the tiny target's config."""
    torch.manual_seed(seed)
    return DraftHead.for_target(tiny(family)).eval()


def draft(family: str, kind: str):
    """Drafts of every kind, cached: a copy of the target, a smaller VLM of the family, a text LM, a head."""
    key = (family, kind)
    if key not in _DRAFTS:
        if kind == "copy":
            _DRAFTS[key] = copy.deepcopy(tiny(family))
        elif kind == "head":
            _DRAFTS[key] = head_for(family)
        elif kind == "pruned_copy":
            _DRAFTS[key] = pruned_copy(family)
        elif kind == "small_vlm":
            _DRAFTS[key] = ADAPTERS.get(family).tiny_model(seed=1, num_layers=2)
        else:
            _DRAFTS[key] = text_lm()
    return _DRAFTS[key]


def speculative(target, inputs, spec, **settings):
    with vtc.apply(target, spec) as handle, torch.no_grad():
        out = target.generate(**inputs, **settings)
        return out, handle.stats.speculative


@pytest.mark.parametrize("kind", ["copy", "small_vlm", "text_lm", "head"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_is_the_targets_for_every_draft(family, kind):
    target = tiny(family)
    inputs, _ = batch_for(target, family, images=[1, 1], batch=2)
    with torch.no_grad():
        expected = target.generate(**inputs, **GREEDY)
    config = vtc.resolve("specdec", draft=draft(family, kind), k=3)
    out, stats = speculative(target, inputs, config, **GREEDY)
    assert torch.equal(out, expected)
    assert stats.tokens == 8 and stats.rounds >= 2
    if kind == "copy":  # the target drafting for itself: every drafted token is kept
        assert stats.acceptance_rate == 1.0 and stats.rounds == 2  # 1 from the prefill, 3 + 1, then 2 + 1


@pytest.mark.parametrize("ragged", [False, True])
def test_the_heads_cache_holds_the_verified_sequence_read_in_one_pass(monkeypatch, ragged):
    """After a speculative generate, the head's cache and its last estimate are what one pass of the head
    over the whole output gives: the entries it made from its own estimates were cropped, and every
    verified position was fed with the target's state and the token that followed it. `ragged`: the rule
    is forced to keep all drafts in row 0 and one in row 1 (the output is then no longer greedy, but the
    head's bookkeeping must still follow it), so rows feed different numbers of verified positions."""
    target = tiny("llava")
    inputs, _ = batch_for(target, "llava", images=[1, 1], batch=2)
    if ragged:

        def uneven(drafted, logits):
            _, tokens = accept_greedy(drafted, logits)
            return torch.tensor([drafted.shape[1], min(1, drafted.shape[1])]), tokens

        monkeypatch.setattr(specdec, "accept_greedy", uneven)
    made = []

    def recording(head, bound):
        made.append(make_draft(head, bound))
        return made[-1]

    make_draft = specdec.make_draft
    monkeypatch.setattr(specdec, "make_draft", recording)
    head = draft("llava", "head")
    out, stats = speculative(target, inputs, vtc.resolve("specdec", draft=head, k=3), **GREEDY)
    loop_draft = made[-1]
    assert stats.rounds >= 3 and loop_draft.hooks == []  # several rounds ran; the hooks are gone
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, inputs["input_ids"].shape[1] :])], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    loop_draft.open()  # its hooks record the target's embeddings and states over the whole output
    with torch.no_grad():
        target(input_ids=out, pixel_values=inputs["pixel_values"], attention_mask=mask, position_ids=positions)
        following = torch.cat([loop_draft.embeds[:, 1:], target.get_input_embeddings()(out[:, -1:])], dim=1)
        whole, _ = head(loop_draft.features[:, :-1], following[:, :-1], mask[:, :-1], positions[:, :-1])
    loop_draft.close()
    # One entry per pair (h_t, e_{t+1}); ragged feeds add masked slots, but the pairs it attends to are these.
    # Ragged, row 0 ends first and is fed filler after (never read); row 1, which ends last, is the check.
    rows = [1] if ragged else [0, 1]
    assert loop_draft.mask[rows].sum(1).tolist() == mask[rows, :-1].sum(1).tolist()
    assert (loop_draft.view.columns > out.shape[1] - 1) == ragged
    torch.testing.assert_close(loop_draft.last[rows], whole[rows, -1], atol=1e-5, rtol=1e-4)


def test_a_head_on_a_pruning_target_or_of_another_shape_is_refused():
    target = tiny("llava")
    inputs, _ = batch_for(target, "llava", images=[1, 1], batch=2)
    head = draft("llava", "head")
    with (
        vtc.apply(target, ["dart.r64", vtc.resolve("specdec", draft=head)]),
        pytest.raises(MethodConflictError, match="dart"),
    ):
        target.generate(**inputs, **GREEDY)
    narrow = copy.deepcopy(target.config.text_config)
    narrow.hidden_size, narrow.intermediate_size = 32, 64
    with pytest.raises(ValueError, match=r"head is 32 wide and the target's language model 64.*for_target"):
        vtc.wrap(target, "specdec", draft=DraftHead(narrow))
    other = copy.deepcopy(target.config.text_config)
    other.vocab_size = 96
    with pytest.raises(ValueError, match="vocabulary of 96 tokens and the target has 128"):
        vtc.wrap(target, "specdec", draft=DraftHead(other))
    assert "generate" not in target.__dict__


def test_adaptive_k_grows_while_drafts_are_kept_and_stays_exact():
    target = tiny("llava")
    inputs, _ = batch_for(target, "llava", images=[1, 1], batch=2)
    with torch.no_grad():
        expected = target.generate(**inputs, **GREEDY)
    config = vtc.resolve("specdec", draft=draft("llava", "copy"), k=1, adaptive=True)
    out, stats = speculative(target, inputs, config, **GREEDY)
    assert torch.equal(out, expected)
    # tokens: 1 from the prefill, k=1 gives 1 + 1, k=3 gives 3 + 1, then one left: a plain verify
    assert stats.rounds == 3 and stats.drafted == 4 and stats.k == 5  # k went 1 -> 3 -> 5
    assert stats.acceptance_rate == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_of_a_padded_batch_equals_its_batch_1_run(family):
    target = tiny(family)
    inputs, samples = batch_for(target, family, images=[1, 1], batch=2)
    config = vtc.resolve("specdec", draft=draft(family, "small_vlm"), k=4)
    batched, _ = speculative(target, inputs, config, **GREEDY)
    for row, sample in enumerate(samples):
        alone, _ = speculative(target, ADAPTERS.get(family).collate(target, [sample]), config, **GREEDY)
        assert torch.equal(batched[row, -8:], alone[0, -8:])


@pytest.mark.parametrize("family", FAMILIES)
def test_with_dart_on_the_target_it_equals_dart_alone(family):
    target = tiny(family)
    inputs, _ = batch_for(target, family, images=[1, 1], batch=2)
    with vtc.apply(target, "dart.r64"), torch.no_grad():
        expected = target.generate(**inputs, **GREEDY)
    config = vtc.resolve("specdec", draft=draft(family, "copy"), k=3)
    out, stats = speculative(target, inputs, ["dart.r64", config], **GREEDY)
    assert torch.equal(out, expected)
    assert stats.rounds >= 2


# alpha 3 over the whole vocabulary: DeCo changes the greedy answer on both tiny models (checked below)
DECO = {"alpha": 3.0, "top_p": 1.0, "top_k": 0}


@pytest.mark.parametrize(("family", "kinds"), [("llava", ["small_vlm", "head"]), ("qwen2_vl", ["small_vlm"])])
def test_with_deco_on_the_target_it_equals_deco_alone(family, kinds):
    """The verify forward corrects every drafted position, so the rule compares drafts with DeCo's argmax."""
    target = tiny(family)
    inputs, _ = batch_for(target, family, images=[1, 1], batch=2)
    deco = vtc.resolve("deco", **DECO)
    with torch.no_grad():
        plain = target.generate(**inputs, **GREEDY)
        with vtc.apply(target, deco):
            expected = target.generate(**inputs, **GREEDY)
    assert not torch.equal(expected, plain)  # DeCo acts here, so equality says something
    for i, kind in enumerate(kinds):
        spec = vtc.resolve("specdec", draft=draft(family, kind), k=3)
        out, stats = speculative(target, inputs, [deco, spec] if i % 2 else [spec, deco], **GREEDY)
        assert torch.equal(out, expected) and stats.rounds >= 2
    copy_ = draft(family, "copy")  # a copy decoding with DeCo drafts exactly what the corrected target emits
    with vtc.apply(copy_, deco):
        out, stats = speculative(target, inputs, [deco, vtc.resolve("specdec", draft=copy_, k=3)], **GREEDY)
    assert torch.equal(out, expected) and stats.acceptance_rate == 1.0


def test_with_deco_sampling_draws_from_the_corrected_distribution():
    """Sampling with one candidate per step must reproduce DeCo's greedy answer, not the plain target's."""
    target = tiny("qwen2_vl")
    inputs, _ = batch_for(target, "qwen2_vl", images=[1, 1], batch=2)
    deco = vtc.resolve("deco", **DECO)
    with vtc.apply(target, deco), torch.no_grad():
        expected = target.generate(**inputs, **GREEDY)
    settings = {**GREEDY, "do_sample": True, "top_k": 1}
    out, _ = speculative(target, inputs, [deco, vtc.resolve("specdec", draft=draft("qwen2_vl", "text_lm"), k=3)],
                         **settings)  # fmt: skip
    assert torch.equal(out, expected)


def pruned_copy(family: str):
    """A copy of the target that drafts through DART at layer 1: on these prompts its rows keep different
    numbers of drafts (checked below), so per-row pacing has something to gain."""
    return copy.deepcopy(tiny(family))


@pytest.mark.parametrize(("family", "batch"), [("llava", 3), ("qwen2_vl", 2), ("qwen2_vl", 3)])
def test_rows_advance_at_their_own_pace_and_each_equals_its_batch_1_run(family, batch):
    target = tiny(family)
    inputs, samples = batch_for(target, family, images=[1] * batch, batch=batch)
    settings = {**GREEDY, "max_new_tokens": 12, "min_new_tokens": 12}
    small = draft(family, "pruned_copy")
    with vtc.apply(small, "dart.r64", layer=1):
        runs = {
            pacing: speculative(target, inputs, vtc.resolve("specdec", draft=small, k=4, pacing=pacing), **settings)
            for pacing in ("row", "batch")
        }
        spec = vtc.resolve("specdec", draft=small, k=4)
        alone = [speculative(target, ADAPTERS.get(family).collate(target, [x]), spec, **settings) for x in samples]
    (out, stats), (lock_out, lock) = runs["row"], runs["batch"]
    assert len(set(stats.row_accepted)) > 1  # the rows kept different numbers of drafts
    assert lock.row_accepted == [min(lock.row_accepted)] * batch  # lock-step: every row the smallest
    for row, (single, single_stats) in enumerate(alone):
        assert torch.equal(out[row, -12:], single[0, -12:])
        assert stats.row_accepted[row] == single_stats.row_accepted[0]  # each row kept what it keeps alone
    assert torch.equal(out, lock_out)
    assert stats.rounds == max(s.rounds for _, s in alone)  # the batch takes as long as its slowest row
    assert stats.rounds <= lock.rounds
    if family == "qwen2_vl":  # here the rows are slow at different times: lock-step costs a forward
        assert stats.rounds < lock.rounds and stats.tokens_per_target_forward > lock.tokens_per_target_forward


def test_packing_the_holes_away_keeps_every_row_exact(monkeypatch):
    """Packed after every round (COMPACT_AT 1): the caches drop the columns every row has a hole in, and
    the output and each row's kept drafts stay those of the unpacked run (which match stock greedy)."""
    target = tiny("qwen2_vl")
    inputs, _ = batch_for(target, "qwen2_vl", images=[1] * 3, batch=3)
    settings = {**GREEDY, "max_new_tokens": 12, "min_new_tokens": 12}
    with torch.no_grad():
        expected = target.generate(**inputs, **settings)
    packed = []
    pack_tail = CacheView.pack_tail

    def counting(view, valid):
        out = pack_tail(view, valid)
        packed.append(valid.shape[1] - out.shape[1])
        return out

    small = draft("qwen2_vl", "pruned_copy")
    spec = vtc.resolve("specdec", draft=small, k=4)
    with vtc.apply(small, "dart.r64", layer=1):
        _, plain = speculative(target, inputs, spec, **settings)
        monkeypatch.setattr(drafts, "COMPACT_AT", 1)
        monkeypatch.setattr(CacheView, "pack_tail", counting)
        out, stats = speculative(target, inputs, spec, **settings)
    assert torch.equal(out, expected) and stats.row_accepted == plain.row_accepted
    assert len(packed) >= 3 and sum(packed) > 0


@pytest.mark.parametrize("family", ["llava"])  # Qwen's pruned draft: the same code path (its own session)
def test_a_draft_pruned_by_its_own_session_keeps_the_output_exact(family):
    target = tiny(family)
    small = draft(family, "small_vlm")
    inputs, _ = batch_for(target, family, images=[1, 1], batch=2)
    with torch.no_grad():
        expected = target.generate(**inputs, **GREEDY)
    with vtc.apply(small, "dart.r64", layer=1) as draft_handle:
        out, _ = speculative(target, inputs, vtc.resolve("specdec", draft=small, k=3), **GREEDY)
        pruned = draft_handle.stats.stages
    assert torch.equal(out, expected)
    assert pruned and sum(pruned[0].visual_after) < sum(pruned[0].visual_before)  # the draft saw fewer tokens


def test_eos_ends_rows_where_the_target_ends_them():
    """No min_new_tokens: a row ends at its EOS, pads after it, and generation stops when all rows ended."""
    target = tiny("llava")
    inputs, _ = batch_for(target, "llava", images=[1, 1], batch=2)
    with torch.no_grad():
        free = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    width = inputs["input_ids"].shape[1]
    eos = int(free[0, width + 4])  # a token row 0 emits fifth: make it the EOS
    settings = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    with torch.no_grad():
        expected = target.generate(**inputs, **settings)
    out, _ = speculative(target, inputs, vtc.resolve("specdec", draft=draft("llava", "copy"), k=4), **settings)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["qwen2_vl"])  # one family: sampling runs the loop greedy runs on both
def test_sampling_with_top_k_1_is_greedy(family):
    """The sampling path end to end: with one candidate per step it must reproduce greedy decoding."""
    target = tiny(family)
    inputs, _ = batch_for(target, family, images=[1, 1], batch=2)
    with torch.no_grad():
        expected = target.generate(**inputs, **GREEDY)
    settings = {**GREEDY, "do_sample": True, "top_k": 1, "temperature": 0.7}
    out, _ = speculative(target, inputs, vtc.resolve("specdec", draft=draft(family, "text_lm"), k=3), **settings)
    assert torch.equal(out, expected)


# -- the rules on toy distributions ------------------------------------------------------------------
def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


def test_speculative_sampling_draws_from_the_target_distribution():
    """Every emitted token (first and second) follows p, whatever q drafted: chi-square at a fixed seed,
    and the same statistic is far over the line for tokens drawn from q (a rule that keeps every draft)."""
    g = torch.Generator().manual_seed(0)
    n, k = 40_000, 2
    p = torch.tensor([[0.40, 0.25, 0.15, 0.12, 0.08], [0.05, 0.10, 0.20, 0.30, 0.35], [0.2] * 5])
    q = torch.tensor([[0.10, 0.10, 0.50, 0.20, 0.10], [0.30, 0.30, 0.20, 0.10, 0.10]])
    drafted = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(k)], dim=1)
    kept, tokens = accept_sampling(drafted, q.expand(n, -1, -1), p.expand(n, -1, -1), generator=g)
    first = torch.where(kept >= 1, drafted[:, 0], tokens[:, 0])
    second = torch.where(kept >= 2, drafted[:, 1], tokens[:, 1])
    critical = 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    assert chi_square(first, p[0]) < critical
    assert chi_square(second[kept >= 1], p[1]) < critical  # p here does not depend on the prefix
    assert chi_square(drafted[:, 0], p[0]) > 50 * critical
    assert bool((kept <= k).all()) and bool((kept == 0).any()) and bool((kept == k).any())


def test_ragged_feeds_are_right_aligned_and_number_only_real_tokens():
    """A draft fed 2 tokens in one row and 1 in another: the short row's slot is masked, and its real token
    takes the row's next position (the position it has in that row's batch-1 run)."""
    tokens, valid = right_aligned([torch.tensor([11, 12]), torch.tensor([21])])
    assert tokens.tolist() == [[11, 12], [0, 21]] and valid.tolist() == [[1, 1], [0, 1]]
    assert continuing(torch.tensor([5, 7]), 2, (), valid).tolist() == [[5, 6], [7, 7]]
    assert continuing(torch.tensor([5, 7]), 2, (3,), valid).shape == (3, 2, 2)  # M-RoPE: every row alike


def test_greedy_rule_keeps_the_agreeing_prefix():
    logits = torch.full((2, 4, 6), -1.0)
    for row, best in enumerate([[3, 4, 5, 1], [3, 0, 5, 2]]):
        logits[row, torch.arange(4), torch.tensor(best)] = 1.0
    kept, tokens = accept_greedy(torch.tensor([[3, 4, 5], [3, 4, 5]]), logits)
    assert kept.tolist() == [3, 1] and tokens[0, 3] == 1 and tokens[1, 1] == 0


def test_warp_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    reference = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    assert torch.equal(warp(logits, 0.7, 20, 0.8).isinf(), reference.isinf())
    torch.testing.assert_close(warp(logits, 0.7, 20, 0.8).softmax(-1), reference.softmax(-1))


# -- refusals -------------------------------------------------------------------------------------------
def test_drafts_the_target_cannot_verify_are_refused_at_wrap():
    target = tiny("llava")
    with pytest.raises(ValueError, match="vocabulary has 64 tokens and the target's 128"):
        vtc.wrap(target, "specdec", draft=text_lm(vocab=64))
    with pytest.raises(ValueError, match="must be of the target's family"):
        vtc.wrap(target, "specdec", draft=tiny("qwen2_vl"))
    with pytest.raises(ValueError, match="the target model itself"):
        vtc.wrap(target, "specdec", draft=target)
    with pytest.raises(ValueError, match="needs a draft model"):
        vtc.wrap(target, "specdec")
    with pytest.raises(ValueError, match="k must be"):
        vtc.wrap(target, "specdec", draft=text_lm(), k=0)
    with pytest.raises(ValueError, match="pacing is 'row'"):
        vtc.wrap(target, "specdec", draft=text_lm(), pacing="rows")
    assert "generate" not in target.__dict__  # nothing was left behind


def test_a_second_loop_or_a_step_it_cannot_apply_per_position_is_refused_at_wrap():
    target = tiny("qwen2_vl")
    spec = vtc.resolve("specdec", draft=text_lm())
    with pytest.raises(MethodConflictError, match=r"specdec and videoscan each replace the decoding loop"):
        vtc.wrap(target, [spec, "videoscan"])
    with pytest.raises(MethodConflictError, match="listed twice"):
        vtc.wrap(target, [spec, vtc.resolve("specdec", draft=text_lm(seed=4))])
    with pytest.raises(MethodConflictError, match=r"dropout_decoding cannot.*ensemble.*with stock generate"):
        vtc.wrap(target, ["dropout_decoding", spec])
    assert "generate" not in target.__dict__


def test_beam_search_is_refused_by_name():
    target = tiny("llava")
    inputs, _ = batch_for(target, "llava", images=[1, 1], batch=2)
    with vtc.apply(target, "specdec", draft=draft("llava", "copy")), pytest.raises(ValueError, match="num_beams"):
        target.generate(**inputs, max_new_tokens=3, num_beams=2)
