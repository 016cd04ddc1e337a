"""The backend choice: argument, then ``use()``, then ``VTC_KERNEL_BACKEND``, then auto; lazy triton."""

from __future__ import annotations

import contextvars
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from kernel_testing import cuda_device

from vtc import kernels
from vtc.kernels import dispatch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_op():
    """An op ``fake`` whose Triton implementation says no, or is not preferred, per the returned flags."""
    state = {"reason": None, "preferred": True}
    dispatch.register("fake", "torch", lambda x: ("torch", x))
    dispatch.register(
        "fake", "triton", lambda x: ("triton", x), lambda x: state["reason"], lambda x: state["preferred"]
    )
    yield state
    dispatch.KERNELS.unregister("fake")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def run(backend=None):
    with kernels.record() as rec:
        name, _ = dispatch.call("fake", 1, backend=backend)
    assert rec == {"fake": name}, "record() must report the backend that ran"
    return name


def test_auto_takes_triton_when_preferred_and_supported(fake_op):
    assert run() == "triton"


@pytest.mark.parametrize(("reason", "preferred"), [("no", True), (None, False)], ids=["unsupported", "not-preferred"])
def test_auto_falls_back_to_torch(fake_op, reason, preferred):
    fake_op.update(reason=reason, preferred=preferred)
    assert run() == "torch"


def test_explicit_triton_that_cannot_run_raises_with_the_reason(fake_op):
    fake_op["reason"] = "rows too long"
    with pytest.raises(RuntimeError, match="cannot run on the triton backend: rows too long"):
        run("triton")


def test_precedence_argument_then_use_then_env(fake_op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert run() == "torch"
    with kernels.use("triton"):
        assert run() == "triton"  # use() beats the environment
        assert run("torch") == "torch"  # the argument beats use()
        with kernels.use("torch"):
            assert run() == "torch"
        assert run() == "triton"  # a with block restores the outer choice
    assert run() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, " AUTO ")
    assert run() == "triton"


def test_use_as_a_call_lasts(fake_op):
    def body():
        kernels.use("torch")  # no with block: the choice holds for the rest of this context
        return run(), kernels.requested()

    assert contextvars.copy_context().run(body) == ("torch", "torch")
    assert kernels.requested() == "auto"


def test_unknown_backends_raise(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.use("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        kernels.requested()


def test_use_holds_in_its_own_thread_only(fake_op):
    """A plain ``use()`` call is a context variable: another thread keeps choosing by the environment."""
    seen = {}

    def body():
        kernels.use("torch")
        worker = threading.Thread(target=lambda: seen.update(thread=(run(), kernels.requested())))
        worker.start()
        worker.join()
        return run()

    assert contextvars.copy_context().run(body) == "torch"
    assert seen["thread"] == ("triton", "auto")


def test_unknown_ops_raise_with_a_suggestion():
    with pytest.raises(LookupError, match=r"unknown kernel op 'topk_gathr'\. Did you mean 'topk_gather'\?"):
        dispatch.call("topk_gathr", torch.zeros(1, 3), 1)


def test_an_op_starts_with_its_torch_reference_and_auto_is_no_implementation():
    with pytest.raises(ValueError, match="torch reference of kernel op 'fresh'"):
        dispatch.register("fresh", "triton", lambda x: x)
    assert "fresh" not in dispatch.KERNELS
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("attn_rows", "auto", lambda x: x)


def test_explicit_backend_without_an_implementation_raises():
    dispatch.register("only_torch", "torch", lambda x: x)
    try:
        with pytest.raises(RuntimeError, match="kernel 'only_torch' has no triton implementation"):
            dispatch.call("only_torch", 1, backend="triton")
        assert dispatch.call("only_torch", 1) == 1  # auto falls back to the reference
    finally:
        dispatch.KERNELS.unregister("only_torch")


def test_env_var_selects_the_backend_of_real_ops(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # CPU tensors + TRITON_INTERPRET=1: the interpreter runs
    with kernels.record() as rec:
        kernels.topk_gather(torch.randn(2, 9), 3)
    assert rec == {"topk_gather": "triton"}


def test_auto_on_cpu_tensors_picks_torch_even_when_interpreting():
    assert dispatch.interpreting(), "the test suite runs Triton in its interpreter"
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8)
    feats, pivots = torch.randn(1, 10, 8), torch.randn(1, 2, 8)
    with kernels.record() as rec:
        kernels.attn_rows(q, k, scale=0.3)
        kernels.topk_gather(torch.randn(2, 9), 3)
        kernels.dup_select(feats, pivots, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 10, dtype=torch.bool))
    assert rec == {"attn_rows": "torch", "topk_gather": "torch", "dup_select": "torch"}


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv(dispatch.INTERPRET_VAR)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.topk_gather(torch.randn(2, 9), 3, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attn_rows(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), scale=0.3, backend="triton")


def test_kernels_compiled_for_the_gpu_refuse_cpu_tensors(monkeypatch):
    from vtc.kernels.topk_gather import triton_impl

    monkeypatch.setattr(triton_impl, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="compiled for the GPU"):
        kernels.topk_gather(torch.randn(2, 9), 3, backend="triton")


def test_shapes_the_kernel_cannot_hold_raise_when_explicit():
    with pytest.raises(RuntimeError, match="cannot copy as words"):
        kernels.topk_gather(torch.zeros(1, 7), 3, torch.zeros(1, 7, dtype=torch.complex64), backend="triton")
    with pytest.raises(RuntimeError, match="share one dtype"):
        kernels.attn_rows(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8).double(), scale=0.3, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_arguments_raise_value_error_on_every_backend(backend):
    with pytest.raises(ValueError, match="multiple of key heads"):
        kernels.attn_rows(torch.randn(1, 3, 2, 8), torch.randn(1, 2, 10, 8), scale=0.3, backend=backend)
    with pytest.raises(ValueError, match="head_reduce must be one of"):
        kernels.attn_rows(
            torch.randn(1, 2, 2, 8), torch.randn(1, 2, 10, 8), scale=0.3, head_reduce="sum", backend=backend
        )
    with pytest.raises(ValueError, match="pool must have shape"):
        counts, pool = torch.ones(1, 2, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
        kernels.dup_select(torch.randn(1, 5, 4), torch.randn(1, 2, 4), counts, pool, backend=backend)


def _python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter with this checkout first on the path; return its JSON output."""
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    clean["PYTHONPATH"] = os.pathsep.join([str(REPO), clean.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_vtc_and_cpu_calls_never_import_triton():
    code = """
import json, sys, torch
import vtc, vtc.kernels
seen = ["triton" in sys.modules]
with vtc.kernels.record() as rec:
    vtc.kernels.topk_gather(torch.randn(2, 9), 3)
    vtc.kernels.attn_rows(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), scale=0.3)
seen.append("triton" in sys.modules)
try:
    vtc.kernels.topk_gather(torch.randn(2, 9), 3, backend="triton")
    error = None
except RuntimeError as exc:
    error = str(exc)
seen.append("triton" in sys.modules)
print(json.dumps({"seen": seen, "rec": rec, "error": error, "file": vtc.__file__}))
"""
    out = _python(code)
    assert out["file"].startswith(str(REPO)), "the subprocess must import this checkout"
    assert out["seen"] == [False, False, False], "triton was imported without a kernel that could run"
    assert out["rec"] == {"topk_gather": "torch", "attn_rows": "torch"}
    assert "TRITON_INTERPRET=1" in out["error"]


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_cuda_tensors():
    device = cuda_device()
    with kernels.record() as rec:
        kernels.topk_gather(torch.randn(2, 9, device=device), 3)
    assert rec == {"topk_gather": "triton"}
    with kernels.record() as rec:
        kernels.topk_gather(torch.randn(2, 9), 3)  # CPU tensors still take the reference
    assert rec == {"topk_gather": "torch"}


# -- docs/KERNELS.md and the registry agree ----------------------------------------------------------------

KERNELS_MD = REPO / "docs" / "KERNELS.md"


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header row starts with `header`, as stripped cells."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no table starting {header!r} in {KERNELS_MD.name}"
    rows = []
    for line in lines[start + 2 :]:  # skip the header and the |---| row
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def code(cell: str) -> str:
    """The text of the one backticked span in a table cell."""
    spans = re.findall(r"`([^`]+)`", cell)
    assert len(spans) == 1, f"expected one `code` span in {cell!r}"
    return spans[0]


def source_file(fn) -> Path:
    """The file that defines `fn` (a lazy Triton entry names its module without importing it)."""
    spec = importlib.util.find_spec(fn.__module__)
    return Path(spec.origin).resolve().relative_to(REPO)


def test_the_docs_op_table_is_the_registry():
    text = KERNELS_MD.read_text()
    rows = markdown_table(text, "| op |")
    documented = {code(row[0]): (code(row[2]), code(row[3])) for row in rows}
    assert sorted(documented) == sorted(dispatch.registered()), "docs/KERNELS.md's op table and the registry differ"
    for op, (reference, triton) in documented.items():
        assert dispatch.registered()[op] == ("torch", "triton"), f"{op}: the table promises both backends"
        impls = dispatch.KERNELS.get(op)
        assert source_file(impls["torch"].fn).as_posix() == reference, f"{op}: the torch reference lives elsewhere"
        assert source_file(impls["triton"].fn).as_posix() == triton, f"{op}: the Triton implementation lives elsewhere"
        assert callable(getattr(kernels, op)) and op in kernels.__all__, f"vtc.kernels.{op} is not public"
        assert f"### `{op}`" in text, f"{op} has no contract section"


def test_the_docs_backend_table_is_the_backends():
    rows = markdown_table(KERNELS_MD.read_text(), "| request |")
    assert [code(row[0]) for row in rows] == list(dispatch.BACKENDS)
