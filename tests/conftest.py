"""Shared fixtures: tiny random models of every adapter family, built in process (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before anything imports triton
# (importing torch does not). With a GPU the kernels compile for real and the `gpu` tests use them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # after the environment above, before triton can be imported

import vtc
from vtc.adapters import ADAPTERS, adapter_for

FAMILIES = ADAPTERS.names()
_MODELS: dict[tuple, torch.nn.Module] = {}


def tiny(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    """A cached tiny model; tests must leave it unwrapped (use vtc.apply or remove their handle)."""
    key = (family, attn, dtype, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = ADAPTERS.get(family).tiny_model(attn_implementation=attn, dtype=dtype, **kw)
    return _MODELS[key]


def batch_for(
    model, family: str, images: list[int] | None = None, batch: int = 2, seed: int = 0, frames: list[int] | None = None
):
    """(padded batch, per-row unpadded samples) for `model`; ``frames`` gives each row a video of that many frames."""
    adapter = ADAPTERS.get(family)
    samples = adapter.make_samples(model, batch=batch, seed=seed, images=images, frames=frames)
    return adapter.collate(model, samples), samples


def instruction_attention(family: str, sample: dict, layer: int):
    """(layer `layer`'s attention ``[H, L, L]`` of one unpadded sample on the eager twin of the tiny
    model, the visual positions, the text positions after the first visual token: the instruction)."""
    with torch.no_grad():
        attention = tiny(family, attn="eager")(**sample, output_attentions=True).attentions[layer][0]
    visual = adapter_for(tiny(family)).visual_mask(sample["input_ids"], None)[0]
    vis = visual.nonzero().flatten()
    text = torch.tensor([i for i in range(len(visual)) if not visual[i] and i > vis[0]])
    return attention, vis, text


def forward_inputs(family: str, inputs: dict) -> dict:
    """`inputs` for a plain forward of a left-padded batch.

    LLaVA's forward numbers positions 0..L-1 whatever the padding (transformers' behaviour; ``generate``
    derives them from the mask), so a padded row only matches its unpadded run with explicit positions.
    Qwen derives its M-RoPE positions from the attention mask itself (``Adapter.mrope``).
    """
    if ADAPTERS.get(family).mrope or "attention_mask" not in inputs:
        return inputs
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {**inputs, "position_ids": positions}


def text_inputs(model, sample: dict, **kwargs) -> tuple[torch.Tensor, object]:
    """The merged input embeddings the text backbone receives for `sample`, and the model's output."""
    from vtc.adapters import adapter_for

    seen = {}

    def grab(module, args, kw) -> None:
        seen["embeds"] = kw["inputs_embeds"]

    hook = adapter_for(model).text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**sample, **kwargs)
    finally:
        hook.remove()
    return seen["embeds"], out


def generate(model, inputs: dict, n: int = 6) -> torch.Tensor:
    """Greedy generation of exactly `n` new tokens; returns only the new tokens."""
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


#: One family per way of laying out and numbering visual tokens: LLaVA-1.5 (one view, 1-D positions),
#: LLaVA-OneVision (anyres tiles, newline tokens, pooled video frames) and Qwen2-VL (merged patches,
#: M-RoPE). A method's own invariants run on these; the matrix (every method on every family, images and
#: videos), the adapter, compaction and FLOPs tests run on all six.
REPRESENTATIVE = ("llava", "llava_onevision", "qwen2_vl")
#: Test files whose `family` cases run on REPRESENTATIVE only (paths relative to tests/).
METHOD_LEVEL = ("methods/", "test_bench.py", "test_budget.py", "test_compose.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Deselect the method-level cases of the families outside REPRESENTATIVE (the run's summary counts them)."""
    root = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        family = getattr(item, "callspec", None) and item.callspec.params.get("family")
        where = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        method_level = any(where == f or (f.endswith("/") and where.startswith(f)) for f in METHOD_LEVEL)
        (drop if method_level and family and family not in REPRESENTATIVE else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _no_leaked_wrap():
    """Every test must leave the cached models unwrapped."""
    yield
    from vtc.engine import ModelSessions

    leaked = [(m, owner) for m in _MODELS.values() if (owner := ModelSessions.find(m)) is not None]
    for _, owner in leaked:
        for session in list(owner.sessions):
            owner.remove(session)
    assert not leaked, f"a test left {[type(m).__name__ for m, _ in leaked]} wrapped"


def hook_ids(model: torch.nn.Module) -> set[tuple[str, str, int]]:
    """Every forward (pre-)hook registered on any submodule."""
    out = set()
    for name, mod in model.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            out |= {(name, kind, k) for k in getattr(mod, kind)}
    return out


__all__ = [
    "FAMILIES", "REPRESENTATIVE", "batch_for", "forward_inputs", "generate", "hook_ids", "text_inputs", "tiny", "vtc"
]  # fmt: skip
