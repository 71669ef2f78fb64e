"""Load a trained model folder for inference.

A stage-2 output folder (or a converted reference checkpoint) holds the model, its tokenizer
(with ``<image>``), the vision tower's image processor and, for folders this package trained,
``training_config.json`` whose ``"template"`` names the conversation template used in training.
``load_model`` returns all of it as one ``LoadedModel``, with the tokenizer padding on the left
(batched generation) and the template checked against the tokenizer. Images are prepared the way
the model config says (``image_aspect_ratio``, and in slice mode ``patch_num`` and the separator
ids training stored): ``LoadedModel.images()`` makes them, ``prompt_ids(turns, images)`` lays
their tokens out.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenpacker_llava.data.images import ImagePreprocessor
from tokenpacker_llava.data.records import Turn
from tokenpacker_llava.data.templates import TEMPLATES, ConversationTemplate, get_template
from tokenpacker_llava.data.tokenize import tokenize_prompt
from tokenpacker_llava.data.visual_inputs import ImageLoader, ImageMode, VisualInput

logger = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """Everything inference needs from a model folder."""

    model: Any  # TokenPackerLlavaForConditionalGeneration, in eval mode
    tokenizer: Any  # padding_side="left", with a pad token
    image_processor: Any
    template: ConversationTemplate
    image_token_id: int
    tokens_per_image: int
    model_id: str
    path: Path

    @property
    def template_name(self) -> str:
        return self.template.name

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_aspect_ratio(self) -> str:
        return self.model.config.image_aspect_ratio

    @property
    def max_length(self) -> int | None:
        """The LLM's context length (``max_position_embeddings``), if it declares one."""
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    @property
    def image_mode(self) -> ImageMode:
        return ImageMode.from_config(self.model.config)

    def preprocessor(self, image_folder: str | Path | None = None) -> ImagePreprocessor:
        """An ``ImagePreprocessor`` as in training (``BadSample`` for missing or corrupt images); one
        tensor per image, so not for slice mode (use ``images``)."""
        return ImagePreprocessor(
            self.image_processor, aspect_ratio=self.image_aspect_ratio, image_folder=image_folder
        )

    def images(self, image_folder: str | Path | None = None) -> ImageLoader:
        """Paths or PIL images -> ``VisualInput`` (views and token ids) as in training, in every mode."""
        return ImageLoader(self.image_processor, self.image_mode, image_folder=image_folder)

    def prompt_ids(self, turns: list[Turn], images: list[VisualInput] | None = None) -> list[int]:
        """The generation prompt of ``turns`` (ending with a user turn), tokenized as in training.

        ``images``: one per ``<image>`` of the turns, in order; each placeholder becomes the image's
        ``token_ids``. Without them every ``<image>`` becomes ``tokens_per_image`` placeholders,
        which slice mode does not allow (its layout depends on the image).
        """
        if images is None and self.image_mode.slicing:
            images = []  # so that a prompt with an <image> fails with a clear count mismatch
        return tokenize_prompt(
            turns,
            self.template,
            self.tokenizer,
            image_token_id=self.image_token_id,
            tokens_per_image=None if images is not None else self.tokens_per_image,
            image_expansions=None if images is None else [image.token_ids for image in images],
        )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 (float16 where unsupported) on GPUs, float32 on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def read_template_name(path: str | Path) -> str | None:
    """The ``"template"`` recorded in the folder's ``training_config.json``, or None."""
    config_file = Path(path) / TRAINING_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    name = config.get("template") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def load_model(
    path: str | Path,
    *,
    template: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    model_id: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the model folder ``path`` for inference.

    ``template`` overrides the template named in ``training_config.json`` (required for folders
    without one, e.g. converted reference checkpoints). ``model_id`` (written into answer files)
    defaults to the folder's name.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    from tokenpacker_llava.models.modeling import TokenPackerLlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    template_name = template or read_template_name(path)
    if template_name is None:
        raise ValueError(
            f"{path} has no {TRAINING_CONFIG_FILE} naming its conversation template; pass --template "
            f"(one of {', '.join(TEMPLATES.names())})"
        )
    device = torch.device(device or default_device())
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = TokenPackerLlavaForConditionalGeneration.from_pretrained(path, **kwargs).to(device).eval()
    config = model.config
    image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
    if config.image_token_id is None or image_token_id != config.image_token_id:
        raise ValueError(
            f"the tokenizer in {path} maps {config.image_token!r} to {image_token_id}, but the model's "
            f"image_token_id is {config.image_token_id}; the folder's tokenizer does not belong to this model"
        )
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    mode = ImageMode.from_config(config)  # fails now, naming what is missing, rather than at the first image
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        template=get_template(template_name, tokenizer),
        image_token_id=image_token_id,
        tokens_per_image=config.num_image_tokens,
        model_id=model_id or path.resolve().name,
        path=path,
    )
    images = (
        f"slice mode, patch_num {mode.patch_num}, {mode.tokens_per_view} tokens per view"
        if mode.slicing
        else f"{loaded.tokens_per_image} tokens per image"
    )
    logger.info("loaded %s (%s, template %s, %s) on %s", path, dtype, template_name, images, device)
    return loaded
