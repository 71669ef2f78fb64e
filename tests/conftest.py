"""Tiny, locally built configs, models and tokenizers shared by the tests.

Nothing is downloaded: every model is a random tiny transformers config, every tokenizer a
SentencePiece model trained here, so the real loading paths run on folders the tests save.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPVisionConfig,
    PretrainedConfig,
    SiglipVisionConfig,
)

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.tokenization import train_llama_tokenizer

VOCAB_SIZE = 300
IMAGE_TOKEN_ID = VOCAB_SIZE  # outside the embedding table, as after ensure_image_token on a full vocab
IMAGE_SIZE = 48
PATCH_SIZE = 4  # 12 x 12 patch grid


def tiny_vision_config(family: str = "clip", num_layers: int = 4, hidden: int = 32) -> PretrainedConfig:
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    if family == "clip":
        return CLIPVisionConfig(**common)
    if family == "siglip":
        return SiglipVisionConfig(**common)
    raise ValueError(family)


def tiny_text_config(family: str = "llama", hidden: int = 64, **overrides) -> PretrainedConfig:
    kwargs = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_config(
    vision: str = "clip",
    text: str = "llama",
    projector: str = "tokenpacker",
    scale_factor: int | None = 2,
    **kw,
) -> TokenPackerLlavaConfig:
    return TokenPackerLlavaConfig(
        vision_config=tiny_vision_config(vision),
        text_config=tiny_text_config(text, **kw.pop("text_overrides", {})),
        projector_type=projector,
        scale_factor=scale_factor if projector == "tokenpacker" else None,
        image_token_id=IMAGE_TOKEN_ID,
        **kw,
    )


def tiny_model(seed: int = 0, **kw) -> TokenPackerLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return TokenPackerLlavaForConditionalGeneration(tiny_config(**kw)).eval()


def multimodal_batch(
    model: TokenPackerLlavaForConditionalGeneration,
    lengths: tuple[tuple[int, int], ...] = ((3, 2), (1, 4)),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One image per row: `before` text tokens, the expanded placeholder, `after` text tokens.

    Rows are left-padded to a common length (as for generation).
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = model.num_image_tokens
    rows = []
    for before, after in lengths:
        text = torch.randint(3, VOCAB_SIZE, (before + after,), generator=generator).tolist()
        rows.append([1] + text[:before] + [IMAGE_TOKEN_ID] * tokens + text[before:])
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixel_values = torch.randn(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def train_sentencepiece(folder: Path, *, legacy: bool = False, vocab_size: int = 400) -> Path:
    """A small byte-fallback BPE SentencePiece model saved as a Llama tokenizer folder."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "a picture of a red square and a blue circle in row 3 column 5",
        "USER: what is in the image? ASSISTANT: a small green triangle.",
        "A chat between a curious user and an artificial intelligence assistant.",
    ] * 40
    return train_llama_tokenizer(corpus, folder, vocab_size=vocab_size, legacy=legacy)


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer")


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)
