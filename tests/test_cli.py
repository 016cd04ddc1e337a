"""The command line: each subcommand runs, prints what it promises, and fails with a one-line error."""

from __future__ import annotations

import json

from vtc.cli import main


def test_flops_prints_the_papers_figure(capsys):
    assert main(["flops", "llava-1.5-7b", "--method", "dart.r128"]) == 0
    out = capsys.readouterr().out
    assert "34.5% of dense" in out and "vision tower" in out


def test_flops_json_and_per_layer(capsys):
    assert main(["flops", "qwen2-vl-7b", "--method", "dart.r64", "--visual-tokens", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["per_layer"]) == 28 and data["prefill"] < data["prefill_dense"]
    assert main(["flops", "llava-1.5-7b", "--per-layer"]) == 0
    assert capsys.readouterr().out.count("100.0%") >= 32


def test_user_errors_exit_2_with_one_line(capsys):
    assert main(["flops", "llava-1.5-7b", "--method", "dartt"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'dart'" in err and "Traceback" not in err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "dart.r128" in out and "qwen2_5_vl" in out


def test_demo_runs_small(tmp_path, capsys):
    from vtc.reference.model import build_model, build_processor

    # An untrained reference model: the demo's machinery, not the shipped weights (tests/reference checks those).
    build_model().save_pretrained(tmp_path)
    build_processor().save_pretrained(tmp_path)
    args = ["demo", "--model", str(tmp_path), "--methods", "dart,random", "--rows", "10", "--repeats", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for setting in ("dense", "192/576 dart keep=48", "128/576 dart keep=32", "64/576 dart keep=16", "random keep=16"):
        assert setting in out
    dense = next(line for line in out.splitlines() if line.strip().startswith("dense"))
    assert "100.0%" in dense  # FLOPs of dense relative to dense
    assert "144.0" in dense  # every visual token kept


def test_bench_prefill_writes_rows(tmp_path, capsys):
    out = tmp_path / "prefill.csv"
    args = ["bench", "prefill", "--hidden", "128", "--layers", "4", "--methods", "dart.r64", "--repeats", "1"]
    assert main([*args, "--warmup", "0", "--out", str(out)]) == 0
    assert "vtc/oracle" in capsys.readouterr().out
    header, row = out.read_text().splitlines()
    assert "vtc_over_oracle" in header and "dart.r64" in row


def test_eta_at_the_rate_so_far():
    from vtc.progress import eta

    assert eta(0.0, 0, 10) == "?"
    assert eta(30.0, 1, 5) == "2:00"  # 30 s a step, four steps left
    assert eta(90.0, 9, 9) == "0:00"
