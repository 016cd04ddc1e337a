"""The attention tap's rows equal the attention weights the layer computes under eager attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import batch_for, forward_inputs, tiny

import vtc
from vtc.config import MethodConfig
from vtc.method import METHODS, AttentionCall, HookPoint, Method, register_method


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TapConfig(MethodConfig):
    layer: int = 1


class _Tap(Method):
    """Test probe: reads the rows of the last 5 query slots at one layer."""

    name = "tap_probe_test"
    config_cls = _TapConfig
    hooks = frozenset({HookPoint.ATTENTION})
    got: dict = {}  # noqa: RUF012  (a test probe)

    def tap_layers(self, num_layers):
        return (self.config.layer,)

    def on_attention(self, call: AttentionCall) -> None:
        batch, length = call.state.index.shape
        rows = torch.arange(length - 5, length).expand(batch, 5)
        columns = torch.arange(0, length, 3).expand(batch, -1)
        _Tap.got = {
            "rows": rows,
            "columns": columns,
            "none": call.rows(rows, columns, head_reduce="none", row_reduce="none"),
            "mean": call.rows(rows, columns),
            "max_sum": call.rows(rows, columns, head_reduce="max", row_reduce="sum"),
        }


@pytest.fixture(autouse=True)
def _probe():
    register_method(_Tap)
    yield
    METHODS.unregister(_Tap.name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_equal_eager_attention_weights(family, attn):
    model = tiny(family, attn=attn)
    inputs, _ = batch_for(model, family, batch=3)
    inputs = forward_inputs(family, inputs)  # rows 1 and 2 are left-padded
    with torch.no_grad():
        reference = tiny(family, attn="eager")(**inputs, output_attentions=True).attentions[1]  # [B, H, L, L]
        with vtc.apply(model, "tap_probe_test"):
            model(**inputs)
    got = _Tap.got
    rows, columns = got["rows"][0], got["columns"][0]
    expected = reference[:, :, rows][..., columns]  # [B, H, R, S]
    torch.testing.assert_close(got["none"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["mean"], expected.mean(dim=(1, 2)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["max_sum"], expected.amax(dim=1).sum(dim=1), atol=1e-5, rtol=1e-4)
