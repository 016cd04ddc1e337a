"""Eval tests run their tiny models on one thread: on a loaded two-core machine, torch's thread pool
makes these small matrix products a hundred times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
