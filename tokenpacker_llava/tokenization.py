"""The ``<image>`` placeholder token in tokenizers and token sequences.

``<image>`` is one special token in the text; before the forward pass it is expanded to as
many copies as the projector emits tokens for that image, so the placeholder count is known
at data time and the model only has to scatter features into those positions. In slice mode
(TokenPacker-HD) the expansion also holds the ``,`` and newline tokens that separate the tiles
(``data.slicing.slice_layout``); ``slice_separator_ids`` finds them in a tokenizer.
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


def expand_images(
    input_ids: Sequence[int], image_token_id: int, expansions: Sequence[Sequence[int]]
) -> list[int]:
    """Replace the k-th ``image_token_id`` by ``expansions[k]``; one expansion per placeholder."""
    count = sum(1 for token in input_ids if token == image_token_id)
    if count != len(expansions):
        raise ValueError(f"{count} image placeholder(s) but {len(expansions)} image expansion(s)")
    expanded: list[int] = []
    images = iter(expansions)
    for token in input_ids:
        if token == image_token_id:
            expanded.extend(next(images))
        else:
            expanded.append(token)
    return expanded


SLICE_SEPARATORS = (",", "\n")  # between the tiles of a row; after each row and the global view


def _byte_level_piece(text: str) -> str | None:
    """GPT-2 byte-level BPE's piece for a one-byte ``text`` (``Ċ`` for a newline, ``,`` for a comma)."""
    data = text.encode("utf-8")
    if len(data) != 1:
        return None
    byte = data[0]
    # Printable ASCII maps to itself; bytes 0-32 map to U+0100 + byte (the first unprintable bytes).
    if 33 <= byte <= 126:
        return text
    return chr(256 + byte) if byte <= 32 else None


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id of one vocabulary token that decodes to exactly ``text``, or None.

    Tried in order: the piece ``text`` itself, its byte-level BPE piece (``Ċ`` for a newline), its
    SentencePiece byte-fallback piece (``<0x0A>``: a Llama tokenizer has no newline piece), and
    finally ``text`` tokenized on its own if that gives a single token.
    """
    pieces = [text, _byte_level_piece(text)]
    data = text.encode("utf-8")
    if len(data) == 1:
        pieces.append(f"<0x{data[0]:02X}>")
    for piece in pieces:
        if piece is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(piece)
        if (
            isinstance(token_id, int)
            and token_id != tokenizer.unk_token_id
            and tokenizer.decode([token_id]) == text
        ):
            return token_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id and tokenizer.decode(ids) == text:
        return ids[0]
    return None


def slice_separator_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(the ``,`` token id, the newline token id) that slice mode puts between tiles and rows.

    Each must be a real token decoding to exactly that character (the reference looked the newline
    up as a vocabulary piece, which Llama tokenizers lack, and silently used ``<unk>``).
    """
    ids = []
    for text in SLICE_SEPARATORS:
        token_id = single_token_id(tokenizer, text)
        if token_id is None:
            raise ValueError(
                f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) has no "
                f"single token decoding to {text!r} (tried the piece, its byte-level and byte-fallback "
                "pieces); slice mode (--image_aspect_ratio slice) needs one to separate image tiles"
            )
        ids.append(token_id)
    return ids[0], ids[1]


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
