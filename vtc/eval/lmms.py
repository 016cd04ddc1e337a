"""A vtc model for lmms-eval: ``lmms_eval --model vtc --model_args pretrained=PATH,method=dart.r64``.

Installed with the ``[lmms]`` extra, which registers :func:`manifest` under lmms-eval's
``lmms_eval.models`` entry-point group, so any lmms-eval task runs on a wrapped model. This module
imports lmms-eval, so nothing else in vtc imports it.

Not yet exercised against an installed lmms-eval in vtc's tests (its dependencies are heavy); the
test that would run it skips when lmms-eval is absent.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.model import lmms

from vtc.eval.runner import DENSE, build_prompt


def manifest() -> Any:
    """lmms-eval's entry-point payload: the model id ``vtc`` and where its class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtc", simple_class_path="vtc.eval.lmms:VTC")


class VTC(lmms):
    """A transformers VLM wrapped with vtc methods, answering lmms-eval's ``generate_until`` requests.

    Args:
        pretrained: hub name or folder of the model (and its processor), or ``reference`` for the model
            shipped with vtc.
        method: ``dense`` or method specs joined by ``+`` (``dart.r64``, ``sparsevlm.r128+dart``).
        device: torch device, or ``auto`` (a GPU when there is one).
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``bfloat16``, ``float16`` or ``float32``.
        batch_size: requests per generate call (left-padded; rows match batch-1 results).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = DENSE,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import vtc
        from vtc.eval import models

        self.model, self.processor = models.load(pretrained, device=device, dtype=dtype)
        self.processor.tokenizer.padding_side = "left"
        self.handle = None if method == DENSE else vtc.wrap(self.model, method.split("+"))
        self.batch_size_per_gpu = int(batch_size)
        self._device = self.model.device

    def generate_until(self, requests: list[Any]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            batch = requests[start : start + self.batch_size_per_gpu]
            prompts, images, gen = [], [], {}
            for req in batch:
                context, gen, doc_to_visual, doc_id, task, split = req.args
                visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
                images.extend(visuals)
                prompts.append(build_prompt(self.processor, context, len(visuals)))
            kwargs = {"text": prompts, "padding": True, "return_tensors": "pt"}
            if images:
                kwargs["images"] = images
            inputs = self.processor(**kwargs).to(self._device)
            with torch.inference_mode():
                ids = self.model.generate(
                    **inputs, max_new_tokens=int(gen.get("max_new_tokens", 128)), do_sample=False,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )  # fmt: skip
            texts = self.processor.tokenizer.batch_decode(
                ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for text in texts:
                for stop in gen.get("until", []) or []:
                    text = text.split(stop)[0]
                out.append(text.strip())
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the vtc lmms-eval model answers generate_until tasks only.")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("the vtc lmms-eval model answers single-round tasks only.")
