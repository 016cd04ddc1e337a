"""The tested transformers range is stated once in code and agrees with the packaging files."""

from __future__ import annotations

import re
from pathlib import Path

from vtc import surface

ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_in_pyproject_is_the_tested_floor():
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([0-9.]+)', text).group(1)
    assert floor == surface.TESTED_FLOOR


def test_constraints_pin_torch_and_the_newest_tested_transformers():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert pins["transformers"] == surface.TESTED_NEWEST
    assert "torch" in pins
