"""Two sessions on one model take turns; each gives what it gives alone; removing one leaves the other."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, forward_inputs, hook_ids, tiny
from engine_fixtures import SeededKeep, SeededKeepConfig, greedy, prefill_positions

import vtc
from vtc import surface
from vtc.method import METHODS, register_method

FAMILIES = ["llava", "qwen2_vl"]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_method(SeededKeep)
    yield
    METHODS.unregister(SeededKeep.name)


def outputs(model, family: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits at the last position and four greedy tokens."""
    with torch.no_grad():
        logits = model(**forward_inputs(family, inputs)).logits[:, -1]
        tokens, _ = greedy(model, family, inputs, 4)
    return logits, tokens


def same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_sessions_take_turns_and_each_gives_what_it_gives_alone(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family, images=[1, 1], batch=2)
    first, second = SeededKeepConfig(layers=(1,), seed=0), SeededKeepConfig(layers=(2,), seed=5)
    dense = outputs(model, family, inputs)
    before = hook_ids(model)  # after a first forward, which may add transformers' own hooks
    with vtc.apply(model, first):
        alone_first = outputs(model, family, inputs)
    with vtc.apply(model, second):
        alone_second = outputs(model, family, inputs)
    assert not same(alone_first, alone_second) and not same(alone_first, dense)

    a = vtc.wrap(model, first)
    b = vtc.wrap(model, second)  # the newest session is the active one
    try:
        assert b.active and not a.active and "idle" in repr(a)
        assert same(outputs(model, family, inputs), alone_second)
        a.activate()
        assert same(outputs(model, family, inputs), alone_first)
        with b.activated():
            assert same(outputs(model, family, inputs), alone_second)
        assert a.active
        a.deactivate()
        assert same(outputs(model, family, inputs), dense)

        # Inside one loop: each session prefills its own cache and they alternate decode steps.
        with torch.no_grad():
            tokens = {}
            for handle in (a, b):
                with handle.activated():
                    tokens[handle], _ = greedy(model, family, inputs, 4)
        assert torch.equal(tokens[a], alone_first[1]) and torch.equal(tokens[b], alone_second[1])

        a.remove()
        assert a.removed and not b.removed
        b.activate()
        assert same(outputs(model, family, inputs), alone_second)
        with pytest.raises(RuntimeError, match="removed"):
            a.activate()
    finally:
        a.remove()
        b.remove()
    assert hook_ids(model) == before
    assert same(outputs(model, family, inputs), dense)


def test_decode_steps_of_two_sessions_interleave_on_their_own_caches():
    """A draft-and-target style loop: one step of each session in turn, each on its own cache."""
    family = "llava"
    model = tiny(family)
    inputs, _ = batch_for(model, family, images=[1, 1], batch=2)
    configs = [SeededKeepConfig(layers=(1,), seed=0), SeededKeepConfig(layers=(2,), seed=5)]
    alone = []
    for config in configs:
        with vtc.apply(model, config), torch.no_grad():
            alone.append(greedy(model, family, inputs, 4)[0])
    handles = [vtc.wrap(model, c) for c in configs]
    try:
        positions = prefill_positions(model, family, inputs)
        state = []
        with torch.no_grad():
            for h in handles:
                with h.activated():
                    state.append(model(**inputs, position_ids=positions, use_cache=True))
            steps = [[], []]
            for _ in range(4):
                for k, h in enumerate(handles):
                    with h.activated():
                        done = len(steps[k])
                        token = state[k].logits[:, -1].argmax(-1, keepdim=True)
                        steps[k].append(token)
                        mask = torch.cat([inputs["attention_mask"], torch.ones(2, done + 1, dtype=torch.long)], 1)
                        state[k] = model(
                            input_ids=token,
                            attention_mask=mask,
                            position_ids=positions[..., -1:] + done + 1,
                            **surface.cache_kwargs(model, surface.output_cache(state[k])),
                        )
    finally:
        for h in handles:
            h.remove()
    for k in range(2):
        assert torch.equal(torch.cat(steps[k], dim=1), alone[k])
