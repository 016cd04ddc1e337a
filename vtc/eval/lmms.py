"""A vtc model for lmms-eval: ``lmms_eval --model vtc --model_args pretrained=PATH,method=dart.r64``.

Installed with the ``[lmms]`` extra, which registers :func:`manifest` under lmms-eval's
``lmms_eval.models`` entry-point group, so any lmms-eval ``generate_until`` task runs on a wrapped
model. This module imports lmms-eval, so nothing else in vtc imports it.

Checked against lmms-eval 0.7.3 by ``scripts/lmms-check.sh`` (the ``slow`` test
``tests/eval/test_lmms.py``): lmms-eval's own command line on ShapesQA exported as a local task
(:mod:`vtc.eval.lmms_task`) gives the predictions and scores ``vtc eval`` gives, dense and pruned.
Prompts are built as ``vtc eval`` builds them (:func:`vtc.eval.runner.build_prompt`: the processor's
chat template when it has one), decoding is greedy, and batches are left-padded, so a row's answer
does not depend on the batch it lands in.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from lmms_eval.api.model import lmms

from vtc.eval.runner import DENSE, build_prompt

#: lmms-eval's generation length when a task names none.
DEFAULT_MAX_NEW_TOKENS = 128


def manifest() -> Any:
    """lmms-eval's entry-point payload: the model id ``vtc`` and where its class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtc", simple_class_path="vtc.eval.lmms.VTC")


class VTC(lmms):
    """A transformers VLM wrapped with vtc methods, answering lmms-eval's ``generate_until`` requests.

    Args:
        pretrained: hub name or folder of the model (and its processor), or ``reference`` for the model
            shipped with vtc.
        method: ``dense`` or method specs joined by ``+`` (``dart.r64``, ``sparsevlm.r128+dart``).
        device: torch device, or ``auto`` (a GPU when there is one); lmms-eval's ``--device`` lands here.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``bfloat16``, ``float16`` or ``float32``.
        batch_size: requests per generate call (lmms-eval's ``--batch_size``; left-padded).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = DENSE,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str | None = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import vtc
        from vtc.eval import models

        try:
            self.batch_size_per_gpu = int(batch_size or 1)
        except ValueError:
            raise ValueError(f"the vtc model takes a whole batch size; got {batch_size!r}.") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size!r}.")
        self.method = str(method)
        self.model, self.processor = models.load(str(pretrained), device=device or "auto", dtype=str(dtype))
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        self.handle = None if self.method == DENSE else vtc.wrap(self.model, self.method.split("+"))
        self._device = next(self.model.parameters()).device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _answer(self, contexts: list[str], visuals: list[list[Any]], gen: dict[str, Any]) -> list[str]:
        """Greedy answers to one batch of prompts sharing generation settings."""
        prompts = [build_prompt(self.processor, text, len(v)) for text, v in zip(contexts, visuals, strict=True)]
        images = [image for v in visuals for image in v]
        kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self._device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs,
                max_new_tokens=int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        out = []
        for text in texts:
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text.strip())
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        """One answer per request, in the requests' order.

        Each request's ``args`` is ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the
        doc is ``self.task_dict[task][split][doc_id]`` (lmms-eval fills ``task_dict``). Requests are
        batched in order, a batch holding only requests with equal ``gen_kwargs``. Decoding is greedy
        whatever ``gen_kwargs`` says about sampling; ``max_new_tokens`` and ``until`` apply.
        """
        out: list[str] = []
        batch: list[tuple[str, list[Any]]] = []
        batch_gen: dict[str, Any] | None = None
        bar = self._progress(len(requests))
        for req in requests:
            context, gen, doc_to_visual, doc_id, task, split = req.args
            gen = dict(gen or {})
            if batch and (len(batch) == self.batch_size_per_gpu or _key(gen) != _key(batch_gen)):
                out.extend(self._answer([c for c, _ in batch], [v for _, v in batch], batch_gen or {}))
                bar.update(len(batch))
                batch = []
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            batch.append((context, [v for v in visuals or [] if v is not None]))
            batch_gen = gen
        if batch:
            out.extend(self._answer([c for c, _ in batch], [v for _, v in batch], batch_gen or {}))
            bar.update(len(batch))
        bar.close()
        return out

    def _progress(self, total: int) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoBar()
        return tqdm(total=total, disable=self.rank != 0, desc=f"vtc {self.method}")

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the vtc lmms-eval model answers generate_until tasks only.")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the vtc lmms-eval model answers single-round tasks only.")


def _key(gen: dict[str, Any] | None) -> str:
    return json.dumps(gen, sort_keys=True, default=str)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
