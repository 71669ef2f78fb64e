"""Batch answering of LLaVA-format question files into LLaVA answer files.

Question files are ``.jsonl`` (one object per line) or ``.json`` (a list of objects). A row is

    {"question_id": 17 | "q17", "image": "val/17.jpg" (optional), "text": "What is ...?",
     "choices": ["cat", "dog"] (optional; or "options", or a {"A": ..., "B": ...} object),
     "hint": "..." (optional, put before the question as MMBench does),
     "category": "..." (optional, copied into the answer's metadata)}

``"question"`` may replace ``"text"``; LLaVA's conversation format (``{"id", "image",
"conversations": [{"from": "human", "value": ...}, ...]}``, e.g. ScienceQA's
``llava_test_CQM-A.json``) is read too, taking the first human turn as the question. An
``<image>`` placeholder in the text is removed: the image, if any, is always put before the
question (``<image>\\n{question}``), as in training. Choices are rendered under the question as
``A. cat`` / ``B. dog`` lines, then ``prompt_suffix`` (e.g. ``Answer with the option's letter from
the given choices directly.``) on its own line.

Each answer is one line of the answer ``.jsonl``::

    {"question_id": ..., "prompt": "<the question as asked, without <image>>", "text": "<answer>",
     "answer_id": "<sha256 of question_id, model_id and prompt>", "model_id": "...",
     "metadata": {"image": ..., "template": ..., "max_new_tokens": ..., "temperature": ..., ...}}

Runs are

* batched: left-padded greedy generation, the same answers as one question at a time;
* deterministic at temperature 0 (no timestamps or random ids), so reruns are identical;
* resumable: a rerun reads the answer file, skips answered questions and appends the rest;
  every batch is written with one ``write`` and flushed (and fsynced), so an interruption loses
  at most that batch, and a partial trailing line left by a crash is cut off on resume;
* shardable: ``num_shards``/``shard_index`` take the questions whose index in the file is
  ``shard_index`` modulo ``num_shards``, each shard writing its own file
  (``shard_file(answers_file, i, n)``); ``merge_answer_files`` joins complete shards into one
  file ordered like the question file, identical to an unsharded run.

Malformed question rows (invalid JSON, no ``question_id``, no text, a duplicate id) raise
``QuestionFileError`` naming the file and the line/item; a missing or undecodable image raises the
image pipeline's ``BadSample`` located at that row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenpacker_llava.data.records import IMAGE_PLACEHOLDER, BadSample, Turn

logger = logging.getLogger(__name__)

OPTION_LETTERS = string.ascii_uppercase
# The metadata keys that must agree between an answer file and the run that appends to it.
SETTINGS_KEYS = ("template", "max_new_tokens", "temperature", "top_p", "num_beams")


class QuestionFileError(ValueError):
    """A question file (or an answer file) that cannot be used as it is; the message names the row."""


# --------------------------------------------------------------------------------------------
# Question files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question_id: str | int
    text: str
    image: str | None = None
    options: tuple[str, ...] = ()
    hint: str | None = None
    category: str | None = None
    where: str = ""  # "questions.jsonl line 3", for messages
    row: int | None = None  # the line (JSONL, 1-based) or item (JSON list, 0-based) of the row

    @property
    def key(self) -> str:
        return question_key(self.question_id)

    def prompt(self, suffix: str | None = None) -> str:
        """The question as asked (no image placeholder): hint, question, lettered options, suffix."""
        text = self.text
        if self.hint:
            text = f"{self.hint}\n{text}"
        for letter, option in zip(OPTION_LETTERS, self.options, strict=False):
            text += f"\n{letter}. {option}"
        if suffix:
            text += f"\n{suffix}"
        return text

    def turns(self, suffix: str | None = None) -> list[Turn]:
        prompt = self.prompt(suffix)
        return [Turn("user", f"{IMAGE_PLACEHOLDER}\n{prompt}" if self.image else prompt)]


def question_key(question_id: Any) -> str:
    """Question ids are matched as strings (17 and "17" are the same question)."""
    return str(question_id)


def _rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, row, parsed object) for every row of a .jsonl or .json file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path.name} line {number}"
                try:
                    yield where, number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise QuestionFileError(
                        f"{where}: invalid JSON ({error.msg} at column {error.colno})"
                    ) from None
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise QuestionFileError(
                f"{path.name}: invalid JSON ({error.msg} at line {error.lineno} column {error.colno})"
            ) from None
        if not isinstance(data, list):
            raise QuestionFileError(f"{path.name}: a .json question file must hold a list of questions")
        for index, item in enumerate(data):
            yield f"{path.name} item {index}", index, item
    else:
        raise QuestionFileError(
            f"{path}: question files are .jsonl or .json, not {path.suffix or 'extensionless'}"
        )


def _options(raw: Any, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, Mapping):
        letters = sorted(raw)
        if letters != list(OPTION_LETTERS[: len(letters)]):
            raise QuestionFileError(f"{where}: option keys must be A, B, C, ... in order, got {letters}")
        raw = [raw[letter] for letter in letters]
    if not isinstance(raw, list) or not all(isinstance(option, str) for option in raw):
        raise QuestionFileError(f"{where}: 'choices'/'options' must be a list of strings")
    if len(raw) > len(OPTION_LETTERS):
        raise QuestionFileError(f"{where}: at most {len(OPTION_LETTERS)} options, got {len(raw)}")
    return tuple(raw)


def parse_question(raw: Any, where: str, row: int | None = None) -> Question:
    """One question row (see the module docstring); ``QuestionFileError`` naming ``where`` otherwise."""
    if not isinstance(raw, Mapping):
        raise QuestionFileError(f"{where}: a question must be a JSON object, got {type(raw).__name__}")
    conversations = raw.get("conversations")
    question_id = raw.get("question_id")
    if question_id is None and conversations is not None:
        question_id = raw.get("id")
    if question_id is None or question_id == "":
        raise QuestionFileError(f"{where}: missing 'question_id'")
    if isinstance(question_id, bool) or not isinstance(question_id, (str, int)):
        raise QuestionFileError(
            f"{where}: 'question_id' must be a string or an integer, got {type(question_id).__name__}"
        )
    text = raw.get("text", raw.get("question"))
    if text is None and isinstance(conversations, list):
        text = next(
            (
                turn.get("value")
                for turn in conversations
                if isinstance(turn, Mapping) and turn.get("from") in ("human", "user")
            ),
            None,
        )
    if text is None:
        raise QuestionFileError(f"{where} (question_id {question_id!r}): missing 'text' (or 'question')")
    if not isinstance(text, str):
        raise QuestionFileError(f"{where} (question_id {question_id!r}): 'text' must be a string")
    text = text.replace(IMAGE_PLACEHOLDER, "").strip()
    if not text:
        raise QuestionFileError(f"{where} (question_id {question_id!r}): the question text is empty")
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise QuestionFileError(f"{where} (question_id {question_id!r}): 'image' must be a non-empty path")
    hint = raw.get("hint")
    if hint is not None and not isinstance(hint, str):
        raise QuestionFileError(f"{where} (question_id {question_id!r}): 'hint' must be a string")
    category = raw.get("category")
    return Question(
        question_id=question_id,
        text=text,
        image=image,
        options=_options(raw.get("choices", raw.get("options")), f"{where} (question_id {question_id!r})"),
        hint=hint.strip() or None if hint else None,
        category=str(category) if category is not None else None,
        where=where,
        row=row,
    )


def load_questions(path: str | Path, *, number_duplicate_ids: bool = False) -> list[Question]:
    """Every question of a ``.jsonl``/``.json`` question file, validated, in file order.

    A repeated ``question_id`` is an error, unless ``number_duplicate_ids``: then its second,
    third, ... occurrence becomes ``id#2``, ``id#3`` (LLaVA's ``llava_mme.jsonl`` gives both
    questions of an image the image's path as id; the MME scorer reads the image up to the ``#``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist")
    questions: list[Question] = []
    seen: dict[str, str] = {}
    occurrences: dict[str, int] = {}
    for where, row, raw in _rows(path):
        question = parse_question(raw, where, row)
        if question.key in seen and number_duplicate_ids:
            occurrences[question.key] = occurrences.get(question.key, 1) + 1
            question = replace(question, question_id=f"{question.question_id}#{occurrences[question.key]}")
        if question.key in seen:
            raise QuestionFileError(
                f"{where}: duplicate question_id {question.question_id!r} (first at {seen[question.key]}); "
                "--number_duplicate_ids numbers repeats as id#2, id#3, ... (LLaVA's MME question file)"
            )
        seen[question.key] = where
        questions.append(question)
    if not questions:
        raise QuestionFileError(f"{path} holds no questions")
    return questions


def select_shard(questions: Sequence[Question], num_shards: int, shard_index: int) -> list[Question]:
    """The questions whose index in the file is ``shard_index`` modulo ``num_shards``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"need num_shards >= 1 and 0 <= shard_index < num_shards, got {shard_index}/{num_shards}"
        )
    return [question for index, question in enumerate(questions) if index % num_shards == shard_index]


def shard_file(answers_file: str | Path, shard_index: int, num_shards: int) -> Path:
    """Where shard ``shard_index`` of ``num_shards`` writes: ``answers.shard-1-of-4.jsonl``;
    ``answers_file`` itself for an unsharded run."""
    answers_file = Path(answers_file)
    if num_shards == 1:
        return answers_file
    return answers_file.with_name(
        f"{answers_file.stem}.shard-{shard_index}-of-{num_shards}{answers_file.suffix}"
    )


# --------------------------------------------------------------------------------------------
# Answer files
# --------------------------------------------------------------------------------------------


def answer_id(question_id: Any, model_id: str, prompt: str) -> str:
    """A deterministic id of one answer (LLaVA writes a random one; reruns should be identical)."""
    payload = json.dumps([question_id, model_id, prompt], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def answer_line(answer: Mapping[str, Any]) -> str:
    return json.dumps(answer, ensure_ascii=False) + "\n"


def _complete_answer(fragment: bytes) -> dict | None:
    """``fragment`` as an answer object (a JSON object with a ``question_id``), or None."""
    try:
        answer = json.loads(fragment.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return answer if isinstance(answer, dict) and "question_id" in answer else None


def read_answer_lines(path: str | Path, *, repair: bool = False) -> list[tuple[int, str, dict]]:
    """(line number, raw line, parsed answer) of every complete line of an answer file.

    A last line without its newline is kept when it is a complete answer object (files joined with
    ``"\\n"`` by other tools end so); with ``repair=True`` its newline is added, so that appended
    answers start on a line of their own. Otherwise it is what an interrupted write leaves: it is
    ignored, and with ``repair=True`` cut off the file. Any other line that is not a JSON object is an
    error.
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if _complete_answer(data[end:]) is not None:
            if repair:
                with path.open("ab") as handle:
                    handle.write(b"\n")
            data, end = data + b"\n", len(data) + 1
        else:
            logger.warning("%s ends with a partial line (an interrupted write); it is dropped", path)
            if repair:
                with path.open("r+b") as handle:
                    handle.truncate(end)
    out = []
    for number, line in enumerate(data[:end].decode("utf-8").split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            answer = json.loads(line)
        except json.JSONDecodeError as error:
            raise QuestionFileError(f"{path.name} line {number}: invalid JSON ({error.msg})") from None
        if not isinstance(answer, dict) or "question_id" not in answer:
            raise QuestionFileError(f"{path.name} line {number}: not an answer object with a question_id")
        out.append((number, line, answer))
    return out


def read_answers(path: str | Path) -> list[dict]:
    """The answers of an answer file, in file order (see ``read_answer_lines``)."""
    return [answer for _, _, answer in read_answer_lines(path)]


def _existing_answers(
    path: Path, prompts: Mapping[str, str], model_id: str, settings: Mapping[str, Any]
) -> set[str]:
    """Keys of the questions ``path`` already answers, after checking it belongs to this run
    (``prompts``: question key -> the prompt this run asks)."""
    if not path.exists():
        return set()
    wanted = prompts
    done: set[str] = set()
    for number, _, answer in read_answer_lines(path, repair=True):
        where = f"{path.name} line {number}"
        key = question_key(answer["question_id"])
        if key not in wanted:
            raise QuestionFileError(
                f"{where}: answers question_id {answer['question_id']!r}, which is not among this run's "
                "questions (another question file, or another shard?); use another answers file"
            )
        if key in done:
            raise QuestionFileError(f"{where}: question_id {answer['question_id']!r} is answered twice")
        if answer.get("model_id") != model_id:
            raise QuestionFileError(
                f"{where}: written by model {answer.get('model_id')!r}, not {model_id!r}; use another answers file"
            )
        if answer.get("prompt") != prompts[key]:
            raise QuestionFileError(
                f"{where}: question_id {answer['question_id']!r} was asked {answer.get('prompt')!r}, this run asks "
                f"{prompts[key]!r} (another question file or prompt suffix?); use another answers file"
            )
        metadata = answer.get("metadata") or {}
        differing = {k: metadata.get(k) for k in SETTINGS_KEYS if metadata.get(k) != settings.get(k)}
        if differing:
            raise QuestionFileError(
                f"{where}: written with other settings {differing} than this run "
                f"({ {k: settings.get(k) for k in differing} }); use the same settings or another answers file"
            )
        done.add(key)
    return done


@dataclass
class AnswerRun:
    """What one ``answer_questions`` call did."""

    answers_file: Path
    total: int  # questions of this shard
    previously_answered: int
    answered: int = 0

    @property
    def complete(self) -> bool:
        return self.previously_answered + self.answered == self.total


def _located(error: BadSample, question: Question) -> BadSample:
    """``error`` naming the question's row and id (and the question file's line)."""
    return BadSample(
        error.kind,
        f"{error.message} ({question.where})",
        row=question.row,
        record_id=str(question.question_id),
    )


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def answer_questions(
    loaded: Any,
    questions: Sequence[Question],
    answers_file: str | Path,
    *,
    image_folder: str | Path | None = None,
    settings: Any = None,
    batch_size: int = 8,
    prompt_suffix: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    max_questions: int | None = None,
) -> AnswerRun:
    """Answer ``questions`` (this shard's) into ``answers_file`` (this shard's file, see ``shard_file``).

    Resumes: questions already in the file are skipped. ``max_questions`` caps how many new
    questions this call answers (a trial run; a later call continues).
    """
    from tokenpacker_llava.inference.generation import GenerationSettings, generate

    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = select_shard(questions, num_shards, shard_index)
    path = shard_file(answers_file, shard_index, num_shards)
    run_settings = {"template": loaded.template_name, **settings.as_dict()}
    prompts = {question.key: question.prompt(prompt_suffix) for question in shard}
    done = _existing_answers(path, prompts, loaded.model_id, run_settings)
    pending = [question for question in shard if question.key not in done]
    if max_questions is not None:
        pending = pending[: max(0, max_questions)]
    run = AnswerRun(path, total=len(shard), previously_answered=len(done))
    if done:
        logger.info("%s: %d of %d questions already answered", path, len(done), len(shard))
    if not pending:
        return run

    images = loaded.images(image_folder)
    # Missing images fail now, not hours into the run (decoding errors surface at their batch).
    for question in pending:
        if question.image is not None:
            try:
                resolved = images.resolve(question.image)
                if not resolved.is_file():
                    raise BadSample("missing_image", f"image {question.image!r} ({resolved}) does not exist")
            except BadSample as error:
                raise _located(error, question) from None

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for batch in _batches(pending, batch_size):
            token_ids, pixels, texts = [], [], []
            for question in batch:
                try:
                    image = images(question.image) if question.image is not None else None
                except BadSample as error:
                    raise _located(error, question) from None
                ids = loaded.prompt_ids(question.turns(prompt_suffix), [image] if image is not None else [])
                if loaded.max_length is not None and len(ids) >= loaded.max_length:
                    raise QuestionFileError(
                        f"{question.where} (question_id {question.question_id!r}): the prompt is {len(ids)} "
                        f"tokens, which leaves no room for an answer in the model's context of {loaded.max_length}"
                    )
                texts.append(prompts[question.key])
                token_ids.append(ids)
                pixels.append(image.pixel_values if image is not None else None)
            outputs = generate(loaded, token_ids, pixels, settings)
            lines = []
            for question, prompt, output in zip(batch, texts, outputs, strict=True):
                metadata: dict[str, Any] = {"image": question.image, **run_settings}
                if question.category is not None:
                    metadata["category"] = question.category
                lines.append(
                    answer_line(
                        {
                            "question_id": question.question_id,
                            "prompt": prompt,
                            "text": output,
                            "answer_id": answer_id(question.question_id, loaded.model_id, prompt),
                            "model_id": loaded.model_id,
                            "metadata": metadata,
                        }
                    )
                )
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            run.answered += len(batch)
            logger.info("%s: %d / %d answered", path.name, run.previously_answered + run.answered, run.total)
    return run


def merge_answer_files(
    questions: Sequence[Question], shard_files: Sequence[str | Path], output: str | Path
) -> Path:
    """Join shard answer files into ``output``, ordered like ``questions``; every question must be
    answered exactly once across the shards (an incomplete shard is an error naming it)."""
    by_key: dict[str, tuple[str, str]] = {}  # key -> (raw line, where)
    wanted = {question.key for question in questions}
    for shard in shard_files:
        shard = Path(shard)
        if not shard.is_file():
            raise FileNotFoundError(f"shard answer file {shard} does not exist")
        for number, line, answer in read_answer_lines(shard):
            where = f"{shard.name} line {number}"
            key = question_key(answer["question_id"])
            if key not in wanted:
                raise QuestionFileError(
                    f"{where}: question_id {answer['question_id']!r} is not in the question file"
                )
            if key in by_key:
                raise QuestionFileError(
                    f"{where}: question_id {answer['question_id']!r} is also answered at {by_key[key][1]}"
                )
            by_key[key] = (line, where)
    missing = [question.question_id for question in questions if question.key not in by_key]
    if missing:
        raise QuestionFileError(
            f"the shard files answer {len(by_key)} of {len(questions)} questions; unanswered: "
            f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''} (finish those shards first)"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text("".join(by_key[question.key][0] + "\n" for question in questions), encoding="utf-8")
    os.replace(temporary, output)
    return output
