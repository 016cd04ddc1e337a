"""The reference model's draft head: its training script reruns to the same bytes and its files round-trip."""

from __future__ import annotations

import pytest
import torch

from vtc.methods.draft_head import DraftHead
from vtc.reference import model as reference
from vtc.reference.train_draft_head import load_head
from vtc.reference.train_draft_head import main as train_main


def test_a_rerun_writes_the_same_bytes_and_the_head_loads_back(tmp_path):
    """Seeded data, seeded init, fixed thread count: two short runs write the same weights; the log names
    the command; the written fp16 head loads back to what was trained, and training changed it."""
    args = ["--examples", "16", "--gen-batch", "8", "--max-new-tokens", "8", "--steps", "3", "--batch", "4",
            "--warmup", "1", "--check-rows", "0", "--quiet"]  # fmt: skip
    for name in ("a", "b"):
        assert train_main(["--out", str(tmp_path / name), *args]) == 0
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b
    assert "python -m vtc.reference.train_draft_head --out" in (tmp_path / "a" / "train_log.txt").read_text()
    model, _ = reference.load()
    trained = load_head(tmp_path / "a", dtype=torch.float16)
    torch.manual_seed(0)
    fresh = DraftHead.for_target(model).to(torch.float16)
    assert trained.state_dict().keys() == fresh.state_dict().keys()
    assert not all(torch.equal(p, q) for p, q in zip(fresh.parameters(), trained.parameters(), strict=True))


def test_load_names_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no draft head at .*train_draft_head"):
        load_head(tmp_path / "nothing")
