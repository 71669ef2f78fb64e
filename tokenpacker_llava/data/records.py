"""LLaVA records: parsing and validating one row, and the bad-sample error kinds.

A LLaVA record is ``{"id": ..., "image": "rel/path.jpg" (optional; a list for several
images), "conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``.
Parsing never guesses: a row that is not a well-formed conversation raises ``BadSample``
naming the row, its id and the reason, and the caller decides (``--on_bad_sample``)
whether that stops the run or is skipped and counted.

One normalization, LLaVA-1.5's (``preprocess_multimodal``): a user turn with a single ``<image>``
starts with ``<image>\n`` followed by the rest of the turn, wherever the data put the
placeholder (LLaVA's instruction data has it at either end of the question; evaluation prompts put
it first). Turns with several images keep their placeholders where they are (interleaved text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IMAGE_PLACEHOLDER = "<image>"

# Every reason a row can be rejected; `data check` counts rows by these kinds.
BAD_SAMPLE_KINDS = (
    "malformed",  # not an object / missing or mistyped fields
    "non_string_value",  # a turn's value (or role, id, image path) is not a string
    "invalid_text",  # a string that is not valid Unicode (a lone UTF-16 surrogate, e.g. cut emoji)
    "unknown_role",
    "no_assistant_turn",
    "empty_answer",
    "turn_order",  # roles do not alternate user -> assistant
    "image_count_mismatch",  # <image> placeholders != images of the row
    "missing_image",
    "empty_image",  # zero-byte file
    "corrupt_image",
    "image_outside_folder",
    "too_long",  # cannot fit model_max_length even after dropping turns
    "no_supervised_tokens",
)


class BadSample(ValueError):
    """A row that cannot be trained on; ``kind`` is one of ``BAD_SAMPLE_KINDS``."""

    def __init__(
        self, kind: str, message: str, *, row: int | None = None, record_id: str | None = None
    ) -> None:
        if kind not in BAD_SAMPLE_KINDS:
            raise ValueError(f"unknown bad-sample kind {kind!r}")
        self.kind = kind
        self.message = message
        self.row = row
        self.record_id = record_id
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.record_id is not None:
            where.append(f"id {self.record_id!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        return f"{prefix}{self.kind}: {self.message}"

    def at(self, row: int | None, record_id: str | None) -> BadSample:
        """The same error, located at a row (filled in by whoever knows the row)."""
        return BadSample(
            self.kind,
            self.message,
            row=self.row if self.row is not None else row,
            record_id=self.record_id if self.record_id is not None else record_id,
        )


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass
class Record:
    """One validated conversation; ``images`` are paths relative to the image folder."""

    id: str
    turns: list[Turn]
    images: list[str] = field(default_factory=list)
    row: int | None = None
    source: str | None = None

    @property
    def has_image(self) -> bool:
        return bool(self.images)


def image_first(text: str) -> str:
    """``text`` with its one ``<image>`` moved to the front, on a line of its own (as LLaVA-1.5)."""
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}" if rest else IMAGE_PLACEHOLDER


def parse_record(raw: Any, *, row: int | None = None, source: str | None = None) -> Record:
    """Validate one raw LLaVA record and return it as a ``Record``; raise ``BadSample`` otherwise."""
    record_id = str(raw.get("id")) if isinstance(raw, Mapping) and raw.get("id") is not None else None

    def bad(kind: str, message: str) -> BadSample:
        return BadSample(kind, message, row=row, record_id=record_id)

    def check_text(text: str, what: str) -> None:
        # JSON's \\uXXXX escapes can encode half of a surrogate pair (scraped text cut inside an
        # emoji); such a string cannot be tokenized or written as UTF-8.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise bad(
                "invalid_text",
                f"{what} holds {text[error.start]!r} at position {error.start}, a lone surrogate",
            ) from None

    if not isinstance(raw, Mapping):
        raise bad("malformed", f"a record must be a JSON object, got {type(raw).__name__}")
    if record_id is None:
        record_id = str(row) if row is not None else "?"
    elif not isinstance(raw["id"], (str, int)):
        raise bad("non_string_value", f"'id' must be a string or integer, got {type(raw['id']).__name__}")
    else:
        record_id = record_id.encode("utf-8", "backslashreplace").decode("utf-8")  # printable in errors
        check_text(str(raw["id"]), "'id'")

    images = raw.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif isinstance(images, list) and all(isinstance(path, str) for path in images):
        images = list(images)
    else:
        raise bad("non_string_value", f"'image' must be a path or a list of paths, got {images!r}")
    if any(not path.strip() for path in images):
        raise bad("malformed", "'image' holds an empty path")
    for path in images:
        check_text(path, "'image'")

    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise bad("malformed", "'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for index, message in enumerate(conversations):
        if not isinstance(message, Mapping) or "from" not in message or "value" not in message:
            raise bad("malformed", f"turn {index} must be an object with 'from' and 'value'")
        speaker, value = message["from"], message["value"]
        if not isinstance(speaker, str):
            raise bad("non_string_value", f"turn {index}: 'from' is {type(speaker).__name__}, not a string")
        if not isinstance(value, str):
            raise bad("non_string_value", f"turn {index}: 'value' is {type(value).__name__}, not a string")
        check_text(value, f"turn {index}: 'value'")
        if speaker not in ROLES:
            raise bad(
                "unknown_role", f"turn {index}: unknown speaker {speaker!r} (expected one of {sorted(ROLES)})"
            )
        role = ROLES[speaker]
        if role == "user" and value.count(IMAGE_PLACEHOLDER) == 1:
            value = image_first(value)
        turns.append(Turn(role, value))

    if turns[0].role == "system":
        dialogue = turns[1:]
    else:
        dialogue = turns
    if any(turn.role == "system" for turn in dialogue):
        raise bad("turn_order", "a system turn may only come first")
    if not any(turn.role == "assistant" for turn in dialogue):
        raise bad("no_assistant_turn", "the conversation has no assistant ('gpt') turn")
    for index, turn in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise bad(
                "turn_order", f"turn {index} is {turn.role!r}; turns must alternate user, assistant, ..."
            )
        if turn.role == "assistant" and not turn.text.strip():
            raise bad("empty_answer", f"assistant turn {index} is empty")
    if dialogue[-1].role != "assistant":
        raise bad("turn_order", "the conversation ends with a user turn that has no answer")

    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(images):
        raise bad(
            "image_count_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text but {len(images)} image(s) in the row",
        )
    for turn in turns:
        # Templates may drop or move a system turn (plain drops it), which would pair the images
        # that follow with the wrong placeholders.
        if turn.role != "user" and IMAGE_PLACEHOLDER in turn.text:
            raise bad(
                "image_count_mismatch",
                f"a {turn.role} turn contains {IMAGE_PLACEHOLDER}; images go in user turns",
            )
    return Record(id=record_id, turns=turns, images=images, row=row, source=source)
