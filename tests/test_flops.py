"""FLOPs: the papers' formula, its GQA-aware variant, and agreement with torch's FLOP counter."""

from __future__ import annotations

import inspect
import json
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import batch_for, tiny
from torch.utils.flop_counter import FlopCounterMode

import vtc
from vtc.adapters import adapter_for
from vtc.flops import KNOWN_DIMS, FlopsReport, ModelDims, decode_flops, report_from_stats
from vtc.measure import flops

REPO = Path(__file__).resolve().parents[1]


def counted(model, sample) -> dict[str, float]:
    """torch's FLOP counts of one forward, per module name."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**sample)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def decoder_layers(counts: dict[str, float]) -> list[float]:
    layers = {int(m.group(1)): v for k, v in counts.items() if (m := re.search(r"language_model\.layers\.(\d+)$", k))}
    return [layers[i] for i in sorted(layers)]


# The counter sees attention products only as plain matmuls (it does not count CPU sdpa), hence eager.
@pytest.mark.parametrize("spec", [None, "dart.r64"])
def test_decoder_flops_match_torch_counter(family, spec):
    model = tiny(family, attn="eager")
    _, samples = batch_for(model, family, batch=1)
    with vtc.apply(model, spec or "dart.noop") as handle:  # noop: the dense model, with stats
        counts = decoder_layers(counted(model, samples[0]))
        handle_stats = handle.stats
    report = report_from_stats(handle_stats, handle_stats.dims, formula="gqa")
    hardware = [2 * x for x in report.per_layer]  # the formula counts multiply-adds; the counter, 2 per
    stage_layers = {s.layer for s in handle_stats.stages if s.visual_after != s.visual_before}
    for i, (c, f) in enumerate(zip(counts, hardware, strict=True)):
        if i not in stage_layers:
            assert c == f, f"layer {i}: counter {c} vs formula {f}"
        else:  # the stage's own scoring runs inside the layer's scope: a small, positive residual
            assert 0 < c - f < 0.05 * f
    assert sum(counts) == pytest.approx(sum(hardware), rel=0.02)


def vision_entries(adapter, sample) -> list[int]:
    """The counts ``VisionDims.macs`` takes for `sample`: LLM tokens per image, or per tower pass for families
    whose tower runs once per view or frame (they read the forward's layout)."""
    visual = adapter.visual_mask(sample["input_ids"], None)
    if "layout" in inspect.signature(adapter.image_token_counts).parameters:
        return adapter.image_token_counts(visual, adapter.layout(visual, sample))
    return adapter.image_token_counts(visual)


def test_vision_flops_match_torch_counter(family):
    model = tiny(family, attn="eager")
    _, samples = batch_for(model, family, batch=1)
    counts = counted(model, samples[0])
    adapter = adapter_for(model)
    pattern = r"\.(vision_tower|visual|multi_modal_projector|vision_resampler)$"
    tower = [v for k, v in counts.items() if re.search(pattern, k)]
    entries = vision_entries(adapter, samples[0])
    assert sum(tower) == pytest.approx(2 * sum(adapter.dims().vision.macs(n) for n in entries), rel=1e-6)


def test_paper_formula_equals_gqa_formula_without_gqa():
    dims = ModelDims("mha", 2, 64, 128, heads=4, kv_heads=4, head_dim=16, vocab=100)
    assert dims.layer_macs(50, 50, "paper") == dims.layer_macs(50, 50, "gqa")
    gqa = ModelDims("gqa", 2, 64, 128, heads=4, kv_heads=2, head_dim=16, vocab=100)
    assert gqa.layer_macs(50, 50, "gqa") < gqa.layer_macs(50, 50, "paper")


def test_llava_7b_dart_r128_by_hand():
    """LLaVA-1.5-7B, 576 visual + 64 text tokens, DART r128 keeps 132 visual tokens from layer 2 on."""
    d, m = 4096, 11008
    per_layer = lambda n: 4 * n * d * d + 2 * n * n * d + 3 * n * d * m  # noqa: E731
    dense = 32 * per_layer(640)
    pruned = 2 * per_layer(640) + 30 * per_layer(196)
    report = vtc.flops("llava-1.5-7b", "dart.r128", text_tokens=64)
    assert report.prefill_dense == dense
    assert report.prefill == pruned
    assert report.prefill_ratio == pytest.approx(pruned / dense)
    assert 0.33 < report.prefill_ratio < 0.36


def test_decode_flops_by_hand():
    dims = KNOWN_DIMS["llava-1.5-7b"]
    cached = [640] * 32
    steps = decode_flops(dims, cached, 2)
    expected = sum(dims.layer_macs(1, 641) + dims.layer_macs(1, 642) for _ in range(32)) + 2 * 4096 * 32064
    assert steps == expected


def test_report_from_a_run_sums_rows_and_keeps_dense_reference(family):
    model = tiny(family)
    inputs, _ = batch_for(model, family)
    with vtc.apply(model, "dart.r64") as handle, torch.no_grad():
        model(**inputs)
        report = handle.stats.flops
        rows = [list(r) for r in zip(*handle.stats.tokens_per_layer, strict=True)]
    dims = handle.adapter.dims()
    assert report.prefill == sum(dims.layer_macs(n, n) for row in rows for n in row)
    assert report.prefill_dense == sum(dims.layer_macs(row[0], row[0]) * dims.num_layers for row in rows)
    assert report.prefill < report.prefill_dense
    assert "prefill" in report.table()
    assert vtc.flops(handle).prefill == report.prefill


def test_flops_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"llava-1\.5-7b") as error:
        vtc.flops("llava-1.5-7", "dart.r64")
    for path in re.findall(r"vtc(?:\.\w+)+", str(error.value)):  # every name the message suggests exists
        assert operator.attrgetter(path.removeprefix("vtc."))(vtc) is not None, path
    with pytest.raises(ValueError, match="visual_tokens"):
        vtc.flops("qwen2-vl-7b", "dart.r64")
    with pytest.raises(ValueError, match="formula"):
        KNOWN_DIMS["qwen2-vl-7b"].layer_macs(1, 1, "hardware")


def test_vtc_flops_is_the_module_and_the_function():
    """``vtc.flops`` is both: ``vtc.flops.ModelDims`` (the module) and ``vtc.flops(...)`` (the README)."""
    import vtc.flops as module
    from vtc import flops as imported

    assert module is imported is vtc.flops is sys.modules["vtc.flops"]
    assert vtc.flops.ModelDims is module.ModelDims is ModelDims
    assert vtc.flops.KNOWN_DIMS["llava-1.5-7b"].hidden == 4096
    called = vtc.flops("llava-1.5-7b", "dart.r128", text_tokens=64)
    assert isinstance(called, FlopsReport)
    assert called == flops("llava-1.5-7b", "dart.r128", text_tokens=64)
    assert called.prefill < called.prefill_dense
    dims = ModelDims("mha", 2, 64, 128, heads=4, kv_heads=4, head_dim=16, vocab=100)
    assert vtc.flops(dims, visual_tokens=10, text_tokens=6).per_layer == (dims.layer_macs(16, 16),) * 2


def test_import_vtc_flops_first_gives_the_callable_module():
    """A fresh interpreter whose first line is ``import vtc.flops as m`` gets the module, callable."""
    code = """
import json
import vtc.flops as m
print(json.dumps({"dims": m.ModelDims.__name__, "known": "llava-1.5-7b" in m.KNOWN_DIMS,
                  "ratio": m("llava-1.5-7b", "dart.r128").prefill_ratio, "file": m.__file__}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(REPO)), "the subprocess must import this checkout"
    assert result["dims"] == "ModelDims" and result["known"]
    assert result["ratio"] == vtc.flops("llava-1.5-7b", "dart.r128").prefill_ratio


def test_repr_is_a_short_summary_and_the_data_stay_on_the_attributes():
    rep = FlopsReport(per_layer=(1.0,) * 16 + (0.5,) * 16, per_layer_dense=(1.0,) * 32, vision=3.0, vision_dense=3.0)
    text = repr(rep)
    assert len(text) < 160 and "\n" not in text
    assert "prefill 24 of 32 (75.0%)" in text and "total 27 of 35 (77.1%)" in text and "32 layers" in text
    assert rep.per_layer[16] == 0.5 and len(rep.per_layer_dense) == 32


def test_dense_counts_the_prompt_before_a_merge_at_the_embeddings():
    """A stage at the embeddings (FocusLLaVA's vision-guided merge) shortens layer 0's input; the dense
    reference is still the whole prompt, so a merge shows as FLOPs saved, not as a smaller dense model."""
    import vtc
    from vtc.eval import shapesqa
    from vtc.flops import decoder_flops
    from vtc.reference.model import build_model, build_processor, prompt

    model, processor = build_model().eval(), build_processor()
    scene, ex = shapesqa.sample_example(0)
    image = shapesqa.render(scene)
    image.paste((128, 128, 128), (0, 0, 96, 60))  # a flat region: windows of identical tokens to merge
    inputs = processor(images=[image], text=[prompt(ex.question)], return_tensors="pt")
    with vtc.apply(model, "focusllava.r64") as handle, torch.no_grad():
        model(**inputs)
    stats = handle.stats
    prompt_tokens = int(inputs["attention_mask"].sum())
    assert stats.input_tokens == [prompt_tokens] and stats.tokens_per_layer[0][0] < prompt_tokens  # merged
    report = stats.flops
    dims = handle.adapter.dims()
    (dense_layer,) = set(decoder_flops(dims, [prompt_tokens] * dims.num_layers))
    assert list(report.per_layer_dense) == pytest.approx([dense_layer] * dims.num_layers)
    assert report.per_layer[0] < dense_layer and report.prefill_ratio < 1.0  # the merge's saving is counted
