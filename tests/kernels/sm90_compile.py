"""Compile every Triton kernel for an NVIDIA GPU without one, and report registers and spills.

Run as a script in a fresh process (``TRITON_INTERPRET`` must be unset before the kernels are
defined): ``python tests/kernels/sm90_compile.py [ARCH]``. A stand-in driver reports an sm_ARCH
target (90 = H100 / H200), every kernel launch becomes a compile-only warm-up, and ptxas (shipped
with triton) builds the cubin; ``cuobjdump`` then reads each kernel's registers and stack (spill)
bytes. Prints one JSON object per compiled kernel. This catches what the CPU interpreter cannot:
code that does not lower for the GPU, and tiles that spill registers.

It uses triton internals (the active-driver hook and ``JITFunction.run``), tested with triton 3.9.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class CompileOnlyDriver:
    """Just enough of a driver for ``JITFunction.run(warmup=True)``: a device, a stream, a target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def resources(kernel) -> tuple[int, int]:
    """(registers, stack bytes) of a compiled kernel, from its cubin."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(found[1]), int(found[2])


def main(arch: int) -> None:
    driver.set_active(CompileOnlyDriver(arch))
    compiled: list[tuple[str, str, object]] = []
    call = [""]  # what the Python side was asked to run, for the report
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled.append((self.fn.__name__, call[0], run(self, *args, grid=grid, warmup=True, **kwargs)))

    jit.JITFunction.run = compile_only

    from vtc.kernels.attn_rows.triton_impl import attn_rows_triton
    from vtc.kernels.dup_select.triton_impl import dup_select_triton
    from vtc.kernels.kv_quant.triton_impl import kv_dequantize_triton, kv_quantize_triton
    from vtc.kernels.topk_gather.triton_impl import topk_gather_triton

    # CPU tensors stand in for device memory: compiling reads only dtypes, strides and alignment.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for hq, hkv, rows, keys, cols, dim in [(32, 32, 1, 650, 576, 128), (28, 4, 32, 8192, 8000, 128),
                                               (32, 32, 100, 2990, 2880, 128), (8, 2, 8, 500, 400, 256)]:  # fmt: skip
            q, k = torch.randn(1, hq, rows, dim).to(dtype), torch.randn(1, hkv, keys, dim).to(dtype)
            kw = {
                "scale": dim**-0.5,
                "q_pos": torch.zeros(1, rows, dtype=torch.long),
                "columns": torch.arange(cols)[None],
            }
            for heads, rows_r in [("mean", "mean"), ("max", "sum"), ("none", "none"), ("none", "max")]:
                call[0] = f"attn_rows {name} Hq{hq}/{hkv} R{rows} D{dim} heads-{heads} rows-{rows_r}"
                attn_rows_triton(q, k, **kw, head_reduce=heads, row_reduce=rows_r)
        call[0] = f"dup_select {name}"
        feats = torch.randn(1, 3000, 4096).to(dtype)
        dup_select_triton(
            feats, feats[:, :8], torch.ones(1, 8, dtype=torch.long), torch.ones(1, 3000, dtype=torch.bool)
        )
        for bits in (2, 4, 8):  # ZipCache's groups in small and large tiles (bf16 only); one tile-sized group
            for rows, group in [(64, 32), (1024, 32), (64, 4096)] if dtype == torch.bfloat16 else [(64, 32)]:
                call[0] = f"kv_quant {name} b{bits} g{group} {rows}x4096"
                kv_dequantize_triton(kv_quantize_triton(torch.randn(rows, 4096).to(dtype), bits, group))
    for n in (650, 4096, 32768):
        call[0] = f"topk_gather N{n}"
        scores, hidden, positions = torch.randn(2, n), torch.randn(2, n, 4096).bfloat16(), torch.arange(n).repeat(2, 1)
        topk_gather_triton(scores, 64, hidden, positions)  # an int k and no mask: no host sync, so the gather runs
        topk_gather_triton(scores, torch.tensor([5, 9]), valid=torch.ones(2, n, dtype=torch.bool))
    for kernel_name, what, kernel in compiled:
        regs, stack = resources(kernel)
        print(json.dumps({"kernel": kernel_name, "call": what, "warps": kernel.metadata.num_warps,
                          "registers": regs, "stack_bytes": stack}))  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
