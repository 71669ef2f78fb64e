"""Batched generation from prompts tokenized exactly as in training.

``generate(loaded, prompts, images, settings)`` left-pads the prompts (token id lists with each
``<image>`` already expanded, see ``LoadedModel.prompt_ids``), stacks their images' views (one
per image, or in slice mode each image's tiles and global view) in placeholder order, runs
``model.generate`` and returns the decoded answers, each cut at its first stop token.
At temperature 0 decoding is greedy (``do_sample=False``), hence deterministic; a batch gives
the same answers as the same prompts one by one (left padding is masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tokenpacker_llava.inference.loading import LoadedModel

# End-of-turn markers of chat formats whose answers end with something other than EOS; each is a
# stop token when the tokenizer has it as an added (special) token.
END_OF_TURN_MARKERS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class PromptTooLong(ValueError):
    """A prompt that leaves no room for the answer in the model's context."""


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1

    def __post_init__(self) -> None:
        # Stored as given into answer metadata: 0 and 0.0 must read back the same.
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def generation_config(self, *, eos_token_ids: list[int], pad_token_id: int, bos_token_id: int | None):
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=not self.greedy,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
        )
        if not self.greedy:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        return GenerationConfig(**kwargs)


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """EOS (of the tokenizer and the model's generation config) plus any end-of-turn marker token."""
    ids: list[int] = []

    def add(value: Any) -> None:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token >= 0 and token not in ids:
                ids.append(token)

    add(loaded.tokenizer.eos_token_id)
    add(getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None))
    added = loaded.tokenizer.get_added_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in added:
            add(added[marker])
    if not ids:
        raise ValueError(
            "the tokenizer has no EOS token and the model no eos_token_id: generation could not stop"
        )
    return ids


def _as_image_list(images: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        return [images] if images.dim() == 3 else list(images)
    views: list[torch.Tensor] = []
    for image in images:
        views.extend([image] if image.dim() == 3 else list(image))
    return views


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded to the longest prompt."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def generate(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    images: Sequence[torch.Tensor | Sequence[torch.Tensor] | None],
    settings: GenerationSettings,
    *,
    streamer: Any = None,
) -> list[str]:
    """Answers to ``prompts`` (one batch); ``images[i]``: the image views of prompt i in placeholder
    order: a ``(3, H, W)`` tensor, a ``(views, 3, H, W)`` tensor (``VisualInput.pixel_values``), a list of
    them, or None.

    ``streamer`` (e.g. ``transformers.TextStreamer(tokenizer, skip_prompt=True)``) needs a single prompt.
    """
    if not prompts:
        return []
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
    if streamer is not None and len(prompts) != 1:
        raise ValueError("streaming needs a batch of one prompt")
    model = loaded.model
    pixel_values: list[torch.Tensor] = []
    max_length = loaded.max_length
    for index, (prompt, entry) in enumerate(zip(prompts, images, strict=True)):
        row_images = _as_image_list(entry)
        placeholders = sum(1 for token in prompt if token == loaded.image_token_id)
        if placeholders != len(row_images) * loaded.tokens_per_image:
            raise ValueError(
                f"prompt {index} holds {placeholders} image tokens but {len(row_images)} image view(s) x "
                f"{loaded.tokens_per_image} tokens were given"
            )
        if max_length is not None and len(prompt) >= max_length:
            raise PromptTooLong(
                f"prompt {index} is {len(prompt)} tokens, which leaves no room for an answer in the model's "
                f"context of {max_length} tokens"
            )
        pixel_values.extend(row_images)
    pad_token_id = loaded.tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = 0
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    stops = stop_token_ids(loaded)
    config = settings.generation_config(
        eos_token_ids=stops, pad_token_id=pad_token_id, bos_token_id=loaded.tokenizer.bos_token_id
    )
    dtype = next(model.parameters()).dtype
    pixels = torch.stack(pixel_values).to(loaded.device, dtype) if pixel_values else None
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(loaded.device),
            attention_mask=attention_mask.to(loaded.device),
            pixel_values=pixels,
            generation_config=config,
            streamer=streamer,
        )
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    answers = []
    for tokens in new_tokens:
        end = next((i for i, token in enumerate(tokens) if token in stops), len(tokens))
        answers.append(loaded.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip())
    return answers
