"""The ``<image>`` placeholder token in tokenizers and token sequences.

``<image>`` is one special token in the text; before the forward pass it is expanded to as
many copies as the projector emits tokens for that image, so the placeholder count is known
at data time and the model only has to scatter features into those positions.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

DEFAULT_IMAGE_TOKEN = "<image>"


def ensure_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = DEFAULT_IMAGE_TOKEN) -> int:
    """Add ``image_token`` as a special token if missing and return its id.

    The id may be past the LLM's embedding table (e.g. 32000 for a 32000-piece Llama):
    the model never looks it up, so the embeddings need no resize.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False
        )
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"could not add {image_token!r} to the tokenizer")
    return token_id


def expand_image_tokens(input_ids: Sequence[int], image_token_id: int, tokens_per_image: int) -> list[int]:
    """Replace each ``image_token_id`` by ``tokens_per_image`` copies of it."""
    expanded: list[int] = []
    for token in input_ids:
        if token == image_token_id:
            expanded.extend([image_token_id] * tokens_per_image)
        else:
            expanded.append(token)
    return expanded


def train_llama_tokenizer(
    corpus: Iterable[str],
    folder: str | Path,
    *,
    vocab_size: int,
    legacy: bool = False,
    user_defined_symbols: Sequence[str] = (),
) -> Path:
    """Train a byte-fallback BPE SentencePiece model on ``corpus`` and save it as a Llama
    tokenizer folder (``tokenizer.model`` + config) that ``AutoTokenizer`` loads.

    For the demo and the tests, where no real tokenizer can be downloaded; the pieces and
    special tokens (<unk> <s> </s> = 0 1 2) follow Llama's layout.
    ``user_defined_symbols`` are always single pieces (e.g. ``<red-circle>``); write them without a
    leading space, since transformers matches them as added tokens in the raw text.
    """
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        user_defined_symbols=list(user_defined_symbols),
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": legacy,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
