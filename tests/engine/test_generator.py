"""A Generator owns the decoding loop: installed as the model's generate, restored by remove()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch_for, tiny
from engine_fixtures import SeededKeep, SeededKeepConfig

import vtc
from vtc import surface
from vtc.config import MethodConfig
from vtc.errors import MethodConflictError
from vtc.method import METHODS, HookPoint, Method, register_method


@dataclasses.dataclass(frozen=True, kw_only=True)
class GreedyLoopConfig(MethodConfig):
    pass


class GreedyLoop(Method):
    """Test generator: greedy decoding written as a loop over the model's forwards."""

    name = "greedy_loop_test"
    config_cls = GreedyLoopConfig
    hooks = frozenset({HookPoint.GENERATE})
    prunes = False

    def generate(self, model, stock, *, input_ids, attention_mask, max_new_tokens, **kwargs):
        inputs = {k: v for k, v in kwargs.items() if k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        net = model.model
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = net(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **inputs)
        tokens = [input_ids]
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            cache = surface.cache_kwargs(net, surface.output_cache(out))
            out = net(input_ids=token, attention_mask=attention_mask, position_ids=positions, **cache)
        return torch.cat(tokens, dim=1)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    for cls in (SeededKeep, GreedyLoop):
        register_method(cls)
    yield
    for cls in (SeededKeep, GreedyLoop):
        METHODS.unregister(cls.name)


def test_a_greedy_loop_generator_equals_stock_greedy_generate():
    model = tiny("llava")
    inputs, _ = batch_for(model, "llava", images=[1, 1], batch=2)
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    pruning = SeededKeepConfig(layers=(2,))
    with vtc.apply(model, pruning), torch.no_grad():
        stock = model.generate(**inputs, **settings)
    assert "generate" not in model.__dict__
    with vtc.apply(model, [pruning, GreedyLoopConfig()]) as handle, torch.no_grad():
        assert "generate" in model.__dict__  # installed on the instance
        looped = model.generate(**inputs, **settings)
        assert handle.stats.decode_steps == 6
        handle.deactivate()  # no session active: transformers' own generate on the dense model
        dense = model.generate(**inputs, **settings)
    assert "generate" not in model.__dict__  # restored by remove()
    assert torch.equal(looped, stock)
    with torch.no_grad():
        assert torch.equal(dense, model.generate(**inputs, **settings))


def test_two_owners_of_the_decoding_loop_are_refused_at_wrap():
    model = tiny("llava")
    with pytest.raises(MethodConflictError, match="decoding"):
        vtc.wrap(model, [GreedyLoopConfig(), "deco"])
    assert "generate" not in model.__dict__
