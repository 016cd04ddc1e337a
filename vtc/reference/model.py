"""The reference VLM: a small LLaVA (CLIP tower, MLP projector, Llama LM) with its own word-level tokenizer.

It is a stock ``LlavaForConditionalGeneration`` with a stock ``LlavaProcessor``: everything vtc does to it,
it does to LLaVA-1.5. Two sets of weights ship (fp16 safetensors), both trained from scratch by
``python -m vtc.reference.train``; :func:`load` reads them through ``from_pretrained``:

- ``weights/``: on ShapesQA, 96 px images, 144 visual tokens (the fast model of the tests and examples);
- ``hard/``: on ShapesQA-hard (``--variant shapesqa_hard``), 192 px images, 576 visual tokens, LLaVA-1.5's
  count, so that the papers' budgets of 192 / 128 / 64 tokens apply as stated (``vtc demo`` runs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vtc.eval import shapesqa

WEIGHTS = Path(__file__).parent / "weights"
HARD_WEIGHTS = Path(__file__).parent / "hard"
IMAGE_TOKEN = "<image>"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
# Every word a ShapesQA prompt or answer uses, and the LLaVA-1.5 conversation words.
WORDS = (
    "USER", "ASSISTANT", ":", "?", ".", ",", "a", "an", "the", "is", "are", "there", "in", "image", "what",
    "color", "how", "many", "shapes", "left", "right", "above", "below", "or", "of", "describe", "and",
    "yes", "no", *shapesqa.SHAPES, *shapesqa.COLORS, *(str(d) for d in range(10)),
)  # fmt: skip
# The LLaVA-1.5 conversation format, as a chat template so processors and harnesses can apply it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_SIZE, PATCH = shapesqa.IMAGE_SIZE, 8  # 12 x 12 = 144 visual tokens per image


def prompt(question: str) -> str:
    """The text the processor expands (what :data:`CHAT_TEMPLATE` renders for one user turn)."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def build_tokenizer(
    specials: tuple[str, ...] = SPECIALS, words: tuple[str, ...] = WORDS, media: dict[str, str] | None = None
) -> Any:
    """A word-level fast tokenizer (``<s>`` first, padding on the left), over ShapesQA's vocabulary by default.

    ``specials`` come first (``<pad>``, ``<s>``, ``</s>``, ``<unk>``, then the media placeholders) and
    ``media`` names the placeholders for the processor (``{"image_token": "<image>"}`` by default); the
    video reference model (:mod:`vtc.reference.video.model`) passes its own words and ``<video>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*specials, *words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", extra_special_tokens=media or {"image_token": IMAGE_TOKEN},
    )  # fmt: skip


def build_processor(tokenizer: Any | None = None, image_size: int = IMAGE_SIZE) -> Any:
    """A ``LlavaProcessor``: CLIP preprocessing at `image_size` px (96: ``<image>`` expands to 144 tokens)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    # The PIL backend: the default one needs torchvision, which CPU installs here do not have.
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_convert_rgb=True,
    )  # fmt: skip
    return LlavaProcessor(
        image_processor=images, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def build_config(
    tokenizer: Any | None = None, *, text_layers: int = 4, text_width: int = 192, image_size: int = IMAGE_SIZE
) -> Any:
    """The architecture: a 4-layer CLIP tower (128 wide) and a Llama LM (4 layers, 192 wide, GQA by default)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = tokenizer or build_tokenizer()
    visual_tokens = (image_size // PATCH) ** 2
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=PATCH, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, projection_dim=128,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=64 * -(-len(tokenizer) // 64), hidden_size=text_width, intermediate_size=8 * text_width // 3,
        num_hidden_layers=text_layers, num_attention_heads=text_width // 32, num_key_value_heads=2,
        max_position_embeddings=512 * -(-(visual_tokens + 256) // 512), rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=visual_tokens, vision_feature_select_strategy="default",
        vision_feature_layer=-1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip


def build_model(seed: int = 0, attn_implementation: str = "sdpa", **architecture: int) -> Any:
    """A freshly initialised reference model (what training starts from)."""
    from transformers import LlavaForConditionalGeneration

    return initialised(LlavaForConditionalGeneration, build_config(**architecture), seed, attn_implementation)


def initialised(model_class: Any, config: Any, seed: int, attn_implementation: str) -> Any:
    """`model_class` freshly initialised from `config` under `seed`, generating with the config's pad and EOS ids."""
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.text_config.eos_token_id
    return model


def weights_folder(path: str | Path | None, default: Path, what: str, script: str) -> Path:
    """`path` (or `default`) as a folder of saved weights; FileNotFoundError naming the training script if not."""
    path = Path(path) if path is not None else default
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no {what} at {path} (config.json is missing); train one with "
            f"`python -m {script} --out <dir>` or pass the folder it wrote."
        )
    return path


def variant_of(model: Any) -> shapesqa.Variant:
    """The ShapesQA variant a reference model was trained on, read from its image size."""
    size = model.config.vision_config.image_size
    for geometry in shapesqa.VARIANTS.values():
        if geometry.size == size:
            return geometry
    sizes = ", ".join(f"{v.name} {v.size} px" for v in shapesqa.VARIANTS.values())
    raise ValueError(f"a reference model at {size} px matches no ShapesQA variant ({sizes}).")


def load(
    path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """The trained reference model and its processor, through the standard ``from_pretrained`` API."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = weights_folder(path, WEIGHTS, "reference model", "vtc.reference.train")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), AutoProcessor.from_pretrained(path)
