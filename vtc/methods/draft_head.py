"""A trained draft head for speculative decoding, in the MSD / EAGLE style.

The head reads what the target has already computed instead of running a second model over the prompt.
At position ``t`` its input is the target's last hidden state ``h_t`` (after the final norm) joined with
the input embedding of token ``t + 1`` (at a visual position: the projected image feature the target was
fed, so the image reaches the head as the target saw it). A linear layer takes the pair to the model's
width, one decoder layer of the target's own language-model class attends over every earlier pair (the
head keeps its own KV cache over the prompt, visual positions included), and the trunk's final norm
gives ``f_{t+1}``: the head's estimate of ``h_{t+1}``. The target's own LM head (shared, frozen) reads
token ``t + 2`` from it.

Why after the final norm: the LM head reads exactly that state, so the head's output lives in the space
of its input, and while it drafts its second and later tokens (whose hidden states the target has not
computed yet) it feeds its own ``f`` in place of ``h``. The normed state also has a bounded scale, which
the pre-norm residual stream of a deep model does not.

The trunk is ``AutoModel.from_config`` of the target's text config cut to one layer, without its token
embedding (the head borrows the target's): masks, rotary positions and the KV cache are the stock
model's, so the head's cache is an ordinary cache that ``CacheView.crop`` crops like any draft's. Its
final norm starts as a copy of the target's (``DraftHead.for_target``) and is trained with the head.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtc import surface

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def one_layer_config(text_config: Any) -> Any:
    """A copy of a language model's config with a single decoder layer (its first layer's type)."""
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = list(types[:1])
    return config


class DraftHead(nn.Module):
    """One decoder layer over ``(target hidden state, next token's embedding)`` pairs.

    Build it for a target with :meth:`for_target` (or from the target's text config), train it (see
    ``vtc.reference.train_draft_head``), and pass it as the draft: ``vtc.wrap(model, "specdec",
    draft=head, k=4)``.

    Args:
        text_config: the target language model's config (``model.config.get_text_config()``).
    """

    def __init__(self, text_config: Any) -> None:
        super().__init__()
        from transformers import AutoModel

        self.config = one_layer_config(text_config)
        width = self.config.hidden_size
        self.fc = nn.Linear(2 * width, width, bias=False)
        self.trunk = AutoModel.from_config(self.config)
        self.trunk.set_input_embeddings(None)  # the head borrows the target's embedding and LM head

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @classmethod
    def for_target(cls, model: nn.Module) -> DraftHead:
        """A fresh head for the VLM `model`; its final norm starts as a copy of the target's."""
        head = cls(model.config.get_text_config())
        target_norm = surface.text_final_norm(model.get_decoder())
        with torch.no_grad():
            surface.text_final_norm(head.trunk).load_state_dict(target_norm.state_dict())
        return head.to(next(model.parameters()).dtype)

    def forward(
        self, features: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        cache: Any = None, *, use_cache: bool = True,
    ) -> tuple[torch.Tensor, Any]:  # fmt: skip
        """Run pairs through the head.

        Args:
            features: ``[B, n, d]`` the target's last hidden states at positions ``t`` (after its final
                norm), or the head's own estimates where the target has none yet.
            embeds: ``[B, n, d]`` the input embeddings of the tokens at ``t + 1``.
            attention_mask: ``[B, past + n]`` the 2-D padding mask over everything the cache holds and
                these pairs.
            position_ids: the pairs' positions (``[B, n]``, or the target's M-RoPE layout).
            cache: the head's KV cache (None: a new one).
            use_cache: False for training over whole sequences (no cache is made).

        Returns:
            ``(f [B, n, d], cache)``: the head's estimates of ``h_{t+1}`` (what the LM head reads for
            token ``t + 2``), and its cache with the pairs appended (None without `use_cache`).
        """
        dtype = self.fc.weight.dtype
        x = self.fc(torch.cat([features.to(dtype), embeds.to(dtype)], dim=-1))  # [B, n, 2d] -> [B, n, d]
        kwargs = {} if cache is None else surface.cache_kwargs(self.trunk, cache)
        out = self.trunk(
            inputs_embeds=x, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs
        )
        return surface.last_hidden_state(out), surface.output_cache(out) if use_cache else None

    # -- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (weights in `dtype`) to `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"kind": "vtc draft head", "text_config": self.config.to_dict()}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        weights = {name: t.detach().to(dtype).contiguous() for name, t in self.state_dict().items()}
        save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return folder

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> DraftHead:
        """A head written by :meth:`save`, in `dtype`."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"no draft head at {folder} ({CONFIG_FILE} and {WEIGHTS_FILE} expected); train one with "
                "`python -m vtc.reference.train_draft_head --out <dir>` or pass the folder it wrote."
            )
        saved = json.loads((folder / CONFIG_FILE).read_text())
        text = dict(saved["text_config"])
        head = cls(AutoConfig.for_model(text.pop("model_type"), **text))
        head.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return head.to(dtype).eval()
