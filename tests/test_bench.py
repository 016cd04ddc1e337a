"""The slicing oracle of ``vtc bench``: it must replay each method's measured schedule, token for token.

vtc/oracle only measures vtc's own overhead if the oracle computes on exactly what vtc computed on: the
same tokens entering every decoder layer, the same pre-pass, the same cache trim. The counts are checked
for every pruning method; where a method only selects tokens (no merged or recycled hidden states), the
oracle's logits must also equal vtc's, which pins the very tokens and their positions, not just how many.
"""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import hook_ids, tiny

import vtc
from vtc import surface
from vtc.adapters import ADAPTERS
from vtc.bench import layer_runs, llava_like, llava_like_sample, prefill_benchmark, pruning_specs
from vtc.cli import append_rows
from vtc.engine import ModelSessions
from vtc.oracle import Schedule, SliceOracle, renumbering_methods
from vtc.state import StageRecord, TokenStats

# What the presets leave untouched on a random tiny model: MustDrop's filter dropping tokens and its cache
# trim, its vision-tower merge (every window merges at cosine -1), FocusLLaVA's merge at the input,
# GemFilter at original positions, SparseVLM without recycling.
SETTINGS = {
    "mustdrop filter": ("mustdrop", {"merge": "off", "global_threshold": 0.05, "individual_threshold": 0.05}),
    "mustdrop merge": ("mustdrop", {"merge_threshold": -1.0, "global_threshold": 0.05, "individual_threshold": 0.05}),
    "focusllava merge": ("focusllava.r64", {"redundancy": -1.0}),
    "focusllava text only": ("focusllava.r64", {"vision_sampler": None}),
    "gemfilter original": ("gemfilter.r64", {"positions": "original"}),
    "sparsevlm no recycling": ("sparsevlm.r128", {"recycle": False}),
}
# Methods that only select tokens: dropping, keeping and renumbering, never writing hidden states.
SELECTING = [
    "dart.r128", "random.r128", "gemfilter.r128", "gemfilter original", "mustdrop filter", "focusllava text only",
    "sparsevlm no recycling",
]  # fmt: skip
# Methods that write hidden states (merged windows, recycled clusters), which the oracle does not do.
MERGING = ["sparsevlm.r128", "mustdrop merge", "focusllava merge"]


def config_of(name: str) -> vtc.MethodConfig:
    spec, overrides = SETTINGS.get(name, (name, {}))
    return vtc.resolve(spec, **overrides)


def one_row(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny(family)
    return model, ADAPTERS.get(family).make_samples(model, batch=1)[0]


def vtc_then_oracle(model, sample, config, fresh=None):
    """vtc's prefill and stats, then the oracle's prefill replaying them: (stats, vtc out, oracle, oracle out)."""
    with vtc.apply(model, config) as handle, torch.no_grad():
        out = model(**sample, use_cache=True)
        stats = handle.stats
        fresh = renumbering_methods(handle.configs) if fresh is None else fresh
    schedule = Schedule.from_stats(stats, sample["input_ids"].shape[1], fresh)
    with SliceOracle(model, schedule) as oracle, torch.no_grad():
        replay = model(**sample, use_cache=True)
    return stats, out, oracle, replay


def row0(per_layer: list[list[int]]) -> list[int]:
    return [n[0] for n in per_layer]


@pytest.mark.parametrize("name", [*pruning_specs(), *SETTINGS])
def test_oracle_computes_on_the_tokens_vtc_measured(family, name):
    model, sample = one_row(family)
    stats, _, oracle, replay = vtc_then_oracle(model, sample, config_of(name))
    assert oracle.tokens_per_layer == row0(stats.tokens_per_layer)
    assert oracle.prepass_tokens_per_layer == row0(stats.prepass_tokens_per_layer)
    assert surface.layer_lengths(surface.output_cache(replay)) == row0(stats.cache_tokens_per_layer)


def test_the_settings_exercise_every_part_of_a_schedule():
    """The parametrized cases above reach multi-stage drops, a pre-pass, a tower stage and a cache trim."""
    model, sample = one_row("llava")
    length = sample["input_ids"].shape[1]
    seen = {}
    for name in ["sparsevlm.r128", "gemfilter.r128", "mustdrop merge", "mustdrop filter"]:
        with vtc.apply(model, config_of(name)) as handle, torch.no_grad():
            model(**sample, use_cache=True)
            seen[name] = Schedule.from_stats(handle.stats, length, renumbering_methods(handle.configs))
    assert len(seen["sparsevlm.r128"].slices) >= 3
    assert seen["gemfilter.r128"].prepass_layers > 0 and seen["gemfilter.r128"].slices[0].fresh
    assert seen["mustdrop merge"].slices[0].layer == 0  # what the tower merged away leaves at the input
    assert seen["mustdrop filter"].cache_trim


@pytest.mark.parametrize("name", SELECTING)
def test_oracle_logits_equal_vtc_for_selecting_methods(family, name):
    model, sample = one_row(family)
    stats, out, _, replay = vtc_then_oracle(model, sample, config_of(name))
    assert stats.tokens_per_layer[-1][0] < sample["input_ids"].shape[1], f"{name} should prune the tiny model"
    torch.testing.assert_close(replay.logits, out.logits)


@pytest.mark.parametrize("name", MERGING)
def test_merging_methods_are_left_out_of_the_logits_check(name):
    """Their merged states change the logits; the oracle matches only their token counts."""
    model, sample = one_row("llava")
    _, out, _, replay = vtc_then_oracle(model, sample, config_of(name))
    assert not torch.allclose(replay.logits, out.logits)


def test_renumbering_is_replayed():
    """GemFilter's second pass numbers its tokens from 0; the oracle at original positions gives other logits."""
    model, sample = one_row("llava")
    _, out, _, fresh = vtc_then_oracle(model, sample, config_of("gemfilter.r128"))
    _, _, _, original = vtc_then_oracle(model, sample, config_of("gemfilter.r128"), fresh=frozenset())
    torch.testing.assert_close(fresh.logits, out.logits)
    assert not torch.allclose(original.logits, out.logits)


def test_schedule_from_hand_made_stats():
    kept = lambda *p: [torch.tensor(p)]  # noqa: E731
    stats = TokenStats(
        tokens_per_layer=[[10], [10], [6], [6], [3], [3]],
        cache_tokens_per_layer=[[10], [10], [3], [3], [3], [3]],
        prepass_tokens_per_layer=[[10], [10]],
        stages=[
            StageRecord("a", 0, kept(), kept(), [8], kept(*range(10))),  # keeps everything: no gather
            StageRecord("b", 2, kept(), kept(), [8], kept(0, 1, 3, 5, 7, 9)),
            StageRecord("c", 4, kept(), kept(), [4], kept(0, 3, 9)),
        ],
    )
    schedule = Schedule.from_stats(stats, 10, fresh={"c"})
    assert [(s.layer, s.index.tolist(), s.fresh) for s in schedule.slices] == [
        (2, [0, 1, 3, 5, 7, 9], False),
        (4, [0, 2, 5], True),  # slots in the sequence stage b left
    ]
    assert schedule.prepass_layers == 2
    assert [(layer, slots.tolist()) for layer, slots in schedule.cache_trim] == [(2, [0, 2, 5]), (3, [0, 2, 5])]


def test_schedule_refuses_what_it_cannot_replay():
    stats = TokenStats(tokens_per_layer=[[10, 9]], stages=[])
    with pytest.raises(ValueError, match="one unpadded row"):
        Schedule.from_stats(stats, 10)
    odd_trim = TokenStats(tokens_per_layer=[[10], [4]], cache_tokens_per_layer=[[7], [4]])
    with pytest.raises(ValueError, match="final tokens"):
        Schedule.from_stats(odd_trim, 10)


def test_oracle_refuses_a_padded_batch():
    model = tiny("llava")
    adapter = ADAPTERS.get("llava")
    samples = adapter.make_samples(model, batch=2)
    inputs = adapter.collate(model, samples)
    schedule = Schedule(inputs["input_ids"].shape[1])
    with SliceOracle(model, schedule), torch.no_grad(), pytest.raises(ValueError, match="one row"):
        model(**inputs)


def test_oracle_is_not_vtc_and_leaves_no_hooks():
    model, sample = one_row("llava")
    config = config_of("dart.r128")
    with vtc.apply(model, config) as handle, torch.no_grad():
        model(**sample)
        schedule = Schedule.from_stats(handle.stats, sample["input_ids"].shape[1])
    before = hook_ids(model)
    attention = surface.attention_implementation(model.config.text_config)
    with SliceOracle(model, schedule), torch.no_grad():
        assert ModelSessions.find(model) is None
        model(**sample)
        assert surface.attention_implementation(model.config.text_config) == attention  # no vtc tap
    assert hook_ids(model) == before


def test_layer_runs():
    assert layer_runs([640, 640, 196, 196, 196, 90]) == "0-1:640 2-4:196 5:90"


def test_benchmark_rows_carry_each_schedule():
    model = llava_like(hidden=128, layers=4, vision_layers=1)
    sample = llava_like_sample(model)
    rows = prefill_benchmark(model, sample, ["gemfilter.r64", "dart.r64"], warmup=0, repeats=1)
    by_spec = {r["spec"]: r for r in rows}
    assert by_spec["gemfilter.r64"]["prepass_layers"] == 2  # filter layer floor(13 / 32 * 4) = 1: layers 0..1
    assert by_spec["gemfilter.r64"]["tokens_per_layer"] == "0-3:128"
    assert by_spec["dart.r64"]["tokens_per_layer"] == "0-1:640 2-3:132"
    assert by_spec["dart.r64"]["layer"] == 2 and by_spec["dart.r64"]["visual_kept"] == 68


def test_append_rows_widens_an_older_file(tmp_path):
    path = tmp_path / "prefill.csv"
    path.write_text("date,spec,vtc_ms\n2026-01-01,dart.r64,1.5\n")
    append_rows(path, [{"spec": "dart.r128", "vtc_ms": 2.5, "tokens_per_layer": "0:10"}], {"date": "2026-02-02"})
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["date", "spec", "vtc_ms", "tokens_per_layer"]
    assert rows[0] == {"date": "2026-01-01", "spec": "dart.r64", "vtc_ms": "1.5", "tokens_per_layer": ""}
    assert rows[1] == {"date": "2026-02-02", "spec": "dart.r128", "vtc_ms": "2.5", "tokens_per_layer": "0:10"}
