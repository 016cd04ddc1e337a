"""The log every reference training script writes: ``train_log.txt`` beside the weights, with the command."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


class RunLog:
    """``say(line)`` for a training run: the line goes to ``<out>/train_log.txt`` and, unless `quiet`, the console.

    The first two lines are the command that reproduces the run and the torch / python / thread setup.

    Args:
        out: the run's output folder (created).
        module: the script's module, as ``python -m`` takes it.
        argv: the script's arguments (None: ``sys.argv[1:]``).
        quiet: keep the console silent (the file still gets every line).
        threads: the torch threads the run uses.
    """

    def __init__(self, out: Path, module: str, argv: Sequence[str] | None, *, quiet: bool, threads: int) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.quiet = quiet
        self._file = open(out / "train_log.txt", "w")  # noqa: SIM115  (closed by close())
        arguments = " ".join(sys.argv[1:] if argv is None else argv)
        self(f"command: python -m {module} {arguments}".rstrip())
        self(f"torch {torch.__version__}, python {platform.python_version()}, threads {threads}")

    def __call__(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
