"""Streaming video: push frames as they arrive, ask a question at any point, push more frames after it.

A model wrapped with VideoScan keeps one carrier per frame in its KV cache (at most ``memory`` of them),
so a stream's memory stays bounded however long the video runs::

    handle = vtc.wrap(model, "videoscan")
    stream = vtc.stream(handle)
    stream.push(processor(text=system_and_video_prompt, videos=first_clip, return_tensors="pt"))
    answer = stream.ask(tokenizer(question, return_tensors="pt"), max_new_tokens=32)
    stream.push(processor(text=video_prompt, videos=next_clip, return_tensors="pt"))  # the video goes on

What a push brings is fed in order: text stays in the cache, each video frame is scanned into its
carrier. A question and its answer are forgotten once answered (``remember=True`` keeps them), so the
next question sees the video, not the previous exchange. Pushing a prompt and asking the rest of it
gives the tokens ``model.generate`` gives for the whole prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vtc.api import Handle
from vtc.methods.videoscan import Scanner, VideoScan, generation_settings
from vtc.state import ScanStats


class VideoStream:
    """One video stream through a model wrapped with VideoScan (make it with ``vtc.stream(handle)``).

    Args:
        handle: the handle of a session that runs ``videoscan``.
    """

    def __init__(self, handle: Handle) -> None:
        methods = [m for m in handle.methods if isinstance(m, VideoScan)]
        if not methods or not methods[0].config.scan:
            raise ValueError(
                "vtc.stream needs a model wrapped with videoscan (e.g. vtc.wrap(model, 'videoscan')); this handle "
                f"runs {[m.name for m in handle.methods]}{' with scan=False' if methods else ''}."
            )
        self.handle = handle
        self._scanner = Scanner(methods[0], handle.session.bound)

    @property
    def stats(self) -> ScanStats:
        """Frames fed, carriers in the bank, and the KV cache's size now."""
        return self._scanner.stats

    @property
    def bank(self) -> list[list[int]]:
        """Per row, the frames (numbered from 0 in the order fed) whose carriers the memory bank holds."""
        return [[frame for frame, _ in row] for row in self._scanner.bank]

    @property
    def cache(self) -> Any:
        """The stream's KV cache (text and carriers, plus the kept frame tokens in "+" mode)."""
        return self._scanner.cache

    def push(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Feed model inputs (text, videos, images; one row per stream row, left-padded as a processor pads).

        Returns:
            ``[B, V]`` the logits after each row's last token fed.
        """
        with self.handle.activated(), torch.no_grad():
            return self._scanner.feed(_as_inputs(inputs))

    def ask(
        self, question: Mapping[str, Any] | torch.Tensor, *, remember: bool = False, **settings: Any
    ) -> torch.Tensor:
        """Answer `question` (token ids ``[B, n]``, or inputs with ``input_ids``) from what was pushed so far.

        Args:
            question: the question's tokens (e.g. the chat template's turn after the video).
            remember: keep the question and the answer in the stream (otherwise they are forgotten).
            **settings: generation settings, as ``generate`` takes them (``max_new_tokens``, ``do_sample``, ...).

        Returns:
            ``[B, new]`` the answer's token ids.
        """
        if self._scanner.cache is None:
            raise ValueError("nothing was pushed yet; push the video (and the prompt before it) first.")
        inputs = _as_inputs(question)
        model = self.handle.model
        config, inputs = generation_settings(model, {**inputs, **settings})
        limit = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
        with self.handle.activated(), torch.no_grad():
            saved = None if remember else self._scanner.snapshot()
            logits = self._scanner.feed(inputs)
            answer = self._scanner.decode(logits, config, limit)
            if saved is not None:
                self._scanner.restore(saved)
        return answer

    def __repr__(self) -> str:
        s = self.stats
        return f"VideoStream(frames={s.frames}, carriers={s.carriers}, cache_bytes={s.cache_bytes})"


def _as_inputs(inputs: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "input_ids" not in inputs:
        raise ValueError("push and ask take model inputs with input_ids (what the processor returns), or ids.")
    return dict(inputs)


def stream(handle: Handle) -> VideoStream:
    """A ``VideoStream`` through `handle`'s model (wrapped with ``videoscan``)."""
    return VideoStream(handle)
