"""Tokenize a conversation into ``input_ids`` and ``labels`` with a right-by-construction mask.

The template renders the conversation to text plus the character spans of each answer and
its end-of-turn marker (``data.templates``). The text is tokenized once, with
``add_special_tokens=False`` (the template wrote the special tokens) and offset mapping, and
a token is supervised iff its offset END lies inside a supervised span
(``span_start < end <= span_end``). The end, not the start, decides because a word piece
carries what precedes its word: a SentencePiece ``"▁fox"`` has the offsets of ``" fox"``
(and a legacy tokenizer's phantom ``"▁"`` after a special token those of the next
character), so a token straddling the boundary between prompt and answer is one the model
generates as part of the answer after the prompt and is supervised. Conversely a token
ending after the span (the newline after ``<|im_end|>``, with its legacy phantom ``"▁"``)
or at its start is not supervised.

One rule on top of "tokenize the text once": a leading ``tokenizer.bos_token`` is split off
and its id prepended, so the text after it is tokenized as the start of a text, exactly as
``tokenizer(text_without_bos)`` does when the tokenizer adds BOS itself. Without it a
non-legacy Llama/Mistral tokenizer (Metaspace ``prepend_scheme="first"``) would tokenize
``"<s>A chat"`` as ``<s> A ...`` instead of the ``<s> ▁A ...`` the model was trained on.

Each ``<image>`` token is then expanded (never supervised): to ``tokens_per_image`` copies,
or, given ``image_expansions``, the k-th ``<image>`` to ``image_expansions[k]`` (slice mode,
where each image has its own layout of tiles and separator tokens, see ``data.visual_inputs``).
``max_length`` counts the expanded length.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenpacker_llava.data.records import IMAGE_PLACEHOLDER, BadSample, Turn
from tokenpacker_llava.data.templates import ConversationTemplate, Rendered, split_turns
from tokenpacker_llava.tokenization import expand_images

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    """One training sample; ``input_ids``/``labels`` already have the images expanded.

    ``num_images`` counts the images kept: if trailing pairs were dropped to fit
    ``max_length``, only the first ``num_images`` images of the record belong to the sample.
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int
    dropped_turns: int = 0  # (user, assistant) pairs dropped from the end to fit max_length
    truncated_answer: bool = False


def _require_offsets(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} has no offset mapping (not a `tokenizers`-backed fast tokenizer); "
            "label masks are computed from token offsets, so load the tokenizer with AutoTokenizer "
            "(use_fast=True) or convert it to a tokenizer.json"
        )


def _encode(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (special tokens written in the text)."""
    _require_offsets(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    shift = 0
    head_ids: list[int] = []
    head_offsets: list[tuple[int, int]] = []
    if bos and text.startswith(bos):
        shift = len(bos)
        head_ids = [tokenizer.convert_tokens_to_ids(bos)]
        head_offsets = [(0, shift)]
    try:
        encoding = tokenizer(
            text[shift:],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
    except NotImplementedError as error:
        raise TypeError(f"{type(tokenizer).__name__} cannot return an offset mapping: {error}") from error
    offsets = encoding["offset_mapping"]
    if shift:
        offsets = [(start + shift, end + shift) for start, end in offsets]
    return head_ids + list(encoding["input_ids"]), head_offsets + [tuple(pair) for pair in offsets]


def _labels(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """``ids`` where a token's offset end lies in ``(start, end]`` of a span, else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    if not spans:
        return labels
    starts = [start for start, _ in spans]
    for index, (token, (_, end)) in enumerate(zip(ids, offsets, strict=True)):
        span = bisect_right(starts, end - 1) - 1  # the last span starting before `end`
        if span >= 0 and starts[span] < end <= spans[span][1]:
            labels[index] = token
    return labels


def _check_images(text: str, ids: Sequence[int], tokenizer: Any, image_token_id: int) -> int:
    """The number of image tokens; a ValueError if some ``<image>`` did not become one token."""
    count = sum(1 for token in ids if token == image_token_id)
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    if not isinstance(image_token, str):
        image_token = IMAGE_PLACEHOLDER
    if text.count(image_token) != count:
        raise ValueError(
            f"the text holds {text.count(image_token)} {image_token!r} placeholder(s) but tokenizes to "
            f"{count} token(s) with id {image_token_id}; add the image token with ensure_image_token(tokenizer)"
        )
    return count


def _expanded_lengths(ids: Sequence[int], image_token_id: int, image_lengths: Sequence[int]) -> list[int]:
    """``cum[i]``: the expanded length of ``ids[:i]``, the k-th image token counting ``image_lengths[k]``."""
    cum = [0]
    image = 0
    for token in ids:
        if token == image_token_id:
            cum.append(cum[-1] + image_lengths[image])
            image += 1
        else:
            cum.append(cum[-1] + 1)
    return cum


def _image_expansions(
    count: int,
    image_token_id: int,
    tokens_per_image: int | None,
    image_expansions: Sequence[Sequence[int]] | None,
) -> list[Sequence[int]]:
    """What each of the first ``count`` images expands to."""
    if image_expansions is None:
        assert tokens_per_image is not None  # checked by the callers
        return [[image_token_id] * tokens_per_image] * count
    if count > len(image_expansions):
        raise ValueError(
            f"the text holds {count} image placeholder(s) but only {len(image_expansions)} image expansion(s) "
            "were given"
        )
    return list(image_expansions[:count])


def _check_expansion_options(
    tokens_per_image: int | None, image_expansions: Sequence[Sequence[int]] | None
) -> None:
    if (tokens_per_image is None) == (image_expansions is None):
        raise ValueError("pass exactly one of tokens_per_image or image_expansions")
    if tokens_per_image is not None and tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
    if image_expansions is not None and any(len(expansion) == 0 for expansion in image_expansions):
        raise ValueError("an image expansion is empty")


class _Encoded:
    """A rendered conversation, tokenized and labelled (before image expansion)."""

    def __init__(
        self,
        rendered: Rendered,
        tokenizer: Any,
        image_token_id: int,
        tokens_per_image: int | None,
        image_expansions: Sequence[Sequence[int]] | None,
    ) -> None:
        self.rendered = rendered
        self.image_token_id = image_token_id
        self.ids, self.offsets = _encode(rendered.text, tokenizer)
        self.labels = _labels(self.ids, self.offsets, rendered.supervised)
        self.num_images = _check_images(rendered.text, self.ids, tokenizer, image_token_id)
        self.expansions = _image_expansions(
            self.num_images, image_token_id, tokens_per_image, image_expansions
        )
        self.cum = _expanded_lengths(self.ids, image_token_id, [len(e) for e in self.expansions])

    @property
    def length(self) -> int:
        return self.cum[-1]

    def tokens_through_span(self, span: int) -> int:
        """How many tokens end no later than supervised span ``span``."""
        end = self.rendered.supervised[span][1]
        count = 0
        while count < len(self.offsets) and self.offsets[count][1] <= end:
            count += 1
        return count

    def length_through_span(self, span: int) -> int:
        """Expanded length of the tokens that end no later than supervised span ``span``."""
        return self.cum[self.tokens_through_span(span)]

    def cut(self, count: int) -> None:
        """Keep the first ``count`` tokens (an image placeholder counts as one)."""
        self.ids = self.ids[:count]
        self.labels = self.labels[:count]
        self.offsets = self.offsets[:count]
        self.cum = self.cum[: count + 1]
        self.num_images = sum(1 for token in self.ids if token == self.image_token_id)
        self.expansions = self.expansions[: self.num_images]


def tokenize_conversation(
    turns: Sequence[Turn],
    template: ConversationTemplate,
    tokenizer: Any,
    *,
    image_token_id: int,
    tokens_per_image: int | None = None,
    image_expansions: Sequence[Sequence[int]] | None = None,
    max_length: int | None,
) -> TokenizedSample:
    """Render, tokenize and label a training conversation, fitting it into ``max_length``.

    Exactly one of ``tokens_per_image`` (every ``<image>`` becomes that many placeholders) and
    ``image_expansions`` (the k-th ``<image>`` becomes ``image_expansions[k]``; at least one per
    image of the conversation) must be given.

    If the expanded sequence is longer than ``max_length``, trailing (user, assistant)
    pairs are dropped while more than one remains; if the first pair alone is still too
    long, the end of its answer is cut, provided the whole prompt (all image tokens
    included) fits with at least one answer token; otherwise ``BadSample("too_long")``. A
    cut never falls inside an image expansion. A sample without any supervised token raises
    ``BadSample("no_supervised_tokens")``. The BadSample carries no row; callers add it with
    ``.at(row, id)``.
    """
    _check_expansion_options(tokens_per_image, image_expansions)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    _require_offsets(tokenizer)
    template.check_tokenizer(tokenizer)
    dialogue = split_turns(turns, add_generation_prompt=False)
    prefix = list(turns[:1]) if dialogue.system is not None else []
    body = list(turns[len(prefix) :])

    def encode(pairs: int) -> _Encoded:
        kept = prefix + body[: 2 * pairs]
        return _Encoded(
            template.render(kept, tokenizer), tokenizer, image_token_id, tokens_per_image, image_expansions
        )

    num_pairs = len(dialogue.pairs)
    encoded = encode(num_pairs)
    if len(encoded.rendered.supervised) != num_pairs:
        raise ValueError(
            f"template {template.name!r} returned {len(encoded.rendered.supervised)} supervised spans "
            f"for {num_pairs} answers"
        )
    keep = num_pairs
    truncated = False
    if max_length is not None and encoded.length > max_length:

        def fits(encoded: _Encoded, pairs: int) -> bool:
            # Through the end of the last kept answer: text after it (ChatML's newline after
            # <|im_end|>) is not trained on and may be cut instead of a whole pair.
            return encoded.length_through_span(pairs - 1) <= max_length

        # Estimate from the full tokenization how many pairs fit, then re-render exactly that
        # conversation (its tokenization may differ slightly at the cut, so check again).
        keep = next((pairs for pairs in range(num_pairs, 0, -1) if fits(encoded, pairs)), 1)
        if keep != num_pairs:
            encoded = encode(keep)
        while keep > 1 and not fits(encoded, keep):
            keep -= 1
            encoded = encode(keep)
        if fits(encoded, keep):
            if encoded.length > max_length:
                encoded.cut(encoded.tokens_through_span(keep - 1))
        else:
            encoded, truncated = _truncate_answer(encoded, max_length), True
    input_ids = expand_images(encoded.ids, image_token_id, encoded.expansions)
    labels: list[int] = []
    images = iter(encoded.expansions)
    for token, label in zip(encoded.ids, encoded.labels, strict=True):
        if token == image_token_id:
            labels.extend([IGNORE_INDEX] * len(next(images)))
        else:
            labels.append(label)
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample(
            "no_supervised_tokens", f"no token of the answers survives tokenization ({template.name})"
        )
    return TokenizedSample(
        input_ids=input_ids,
        labels=labels,
        num_images=encoded.num_images,
        dropped_turns=num_pairs - keep,
        truncated_answer=truncated,
    )


def _truncate_answer(encoded: _Encoded, max_length: int) -> _Encoded:
    """Cut the end of the (single) answer so the expanded length is at most ``max_length``."""
    first = next((i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX), None)
    if first is None:
        raise BadSample("no_supervised_tokens", "the answer has no supervised token")
    prompt = encoded.cum[first]
    if prompt + 1 > max_length:
        raise BadSample(
            "too_long",
            f"the prompt alone is {prompt} tokens ({encoded.num_images} image(s) included), "
            f"no answer token fits in max_length={max_length}",
        )
    encoded.cut(bisect_right(encoded.cum, max_length) - 1)  # whole tokens (an image is one token here)
    return encoded


def tokenize_prompt(
    turns: Sequence[Turn],
    template: ConversationTemplate,
    tokenizer: Any,
    *,
    image_token_id: int,
    tokens_per_image: int | None = None,
    image_expansions: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """Token ids of a generation prompt (turns end with a user turn), images expanded.

    Rendered with ``add_generation_prompt=True`` and tokenized exactly as in training; images are
    expanded as by ``tokenize_conversation`` (exactly one of ``tokens_per_image`` and
    ``image_expansions``, which then needs exactly one expansion per ``<image>``).
    """
    _check_expansion_options(tokens_per_image, image_expansions)
    _require_offsets(tokenizer)
    template.check_tokenizer(tokenizer)
    rendered = template.render(turns, tokenizer, add_generation_prompt=True)
    ids, _ = _encode(rendered.text, tokenizer)
    count = _check_images(rendered.text, ids, tokenizer, image_token_id)
    if image_expansions is not None and len(image_expansions) != count:
        raise ValueError(
            f"the prompt holds {count} image placeholder(s) but {len(image_expansions)} image(s) were given"
        )
    return expand_images(
        ids, image_token_id, _image_expansions(count, image_token_id, tokens_per_image, image_expansions)
    )
