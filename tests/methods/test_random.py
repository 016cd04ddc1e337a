"""Random pruning: seeded, independent of the batch, spread over the image, and the counts it declares."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, forward_inputs, tiny

import vtc
from vtc.methods.random import RandomConfig, token_hash


def kept_ordinals(model, family: str, config: RandomConfig, batch: int = 2) -> list[list[int]]:
    inputs, _ = batch_for(model, family, batch=batch)
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**forward_inputs(family, inputs))
    return [handle.stats.stages[0].kept_visual[b].tolist() for b in range(batch)]


def test_keeps_the_declared_count_with_a_seeded_subset(family):
    model = tiny(family)
    first = kept_ordinals(model, family, RandomConfig(keep=20, seed=0))
    again = kept_ordinals(model, family, RandomConfig(keep=20, seed=0))
    other = kept_ordinals(model, family, RandomConfig(keep=20, seed=1))
    assert all(len(row) == 20 for row in first)
    assert first == again
    assert first[0] != other[0]


def test_subset_is_spread_over_the_visual_tokens(family):
    model = tiny(family)
    kept = kept_ordinals(model, family, RandomConfig(keep_ratio=0.25), batch=1)[0]
    n = len(kept) * 4  # at least this many visual tokens: the ratio rounds down
    assert kept != list(range(len(kept)))  # not the first tokens
    # A uniform quarter of the tokens: each half of the image gets some, neither gets almost all.
    low = sum(k < n // 2 for k in kept)
    assert 0.2 * len(kept) < low < 0.8 * len(kept)


def test_token_hash_is_uniform_and_collision_free_on_small_ranges():
    values = token_hash(torch.arange(4096), seed=0)
    assert values.unique().numel() == 4096
    assert values.min() >= 0 and values.max() < 2**32
    assert abs(values.double().mean().item() / 2**32 - 0.5) < 0.02
    assert not torch.equal(values, token_hash(torch.arange(4096), seed=1))


@pytest.mark.parametrize("settings", [{"keep": 5, "keep_ratio": 0.5}, {"keep": -1}, {"keep_ratio": 1.5}, {"seed": -2}])
def test_bad_settings_name_the_problem(settings):
    with pytest.raises(ValueError, match="random"):
        RandomConfig(**settings)
