"""Benchmark scorers, registered by exact name in ``BENCHMARKS``.

Every scorer reads the answer ``.jsonl`` written by ``tokenpacker-llava answer`` / ``eval`` (LLaVA's
format: ``question_id``, ``prompt``, ``text``, ``metadata``) and the benchmark's annotation file, pairs
them by ``question_id`` (compared as strings), and returns a dict of metrics. Accuracies are
percentages (0-100); MME reports its score sums. An answer without an annotation is an error (the
wrong annotation file, most likely); annotated questions without an answer are only counted
(``num_unanswered``), so a subset of a benchmark can be scored.

Annotation files (``.json``, ``.jsonl``, or ``.tsv`` for MMBench):

``vqav2``
    The official annotations (``v2_mscoco_val2014_annotations.json``: ``{"annotations":
    [{"question_id", "answers": [{"answer": ...} x 10], "answer_type", "question_type", ...}]}``)
    or rows ``{"question_id", "answers": ["...", ...] (strings or {"answer": ...}),
    "answer_type" (optional)}``. Scored exactly as ``vqaEval.py``: the prediction normalized
    (punctuation, the digit-period rule "2." -> "2", number words -> digits, articles dropped,
    contractions), the annotators' answers used as released (punctuation-processed when they
    disagree), accuracy ``min(#matching annotators / 3, 1)`` averaged over the 10 leave-one-out
    subsets. Metrics: ``accuracy``, ``per_answer_type``.
``gqa``
    The official question file (``testdev_balanced_questions.json``: ``{question_id: {"answer",
    "types": {"structural": ...}, "isBalanced", ...}}``) or rows ``{"question_id", "answer"}``.
    Exact match after lower-casing, trimming and dropping trailing periods (LLaVA's conversion).
    Rows with ``"isBalanced": false`` are not scored. Metrics: ``accuracy``, and ``binary`` /
    ``open`` (structural type ``query``) accuracies when ``types`` are given.
``textvqa``
    The official file (``TextVQA_0.5.1_val.json``: ``{"data": [{"question_id", "answers": [10
    strings], ...}]}``) or rows ``{"question_id", "answers"}``. VQA accuracy over the 10
    answers, prediction and answers normalized by EvalAI's answer processor. Metric: ``accuracy``.
``pope``
    POPE's label files (``coco_pope_*.json``, JSON lines ``{"question_id", "label": "yes"|"no"}``),
    optionally with a ``"category"`` (adversarial / popular / random; else taken from the answer's
    metadata). Answers are read as yes/no the way LLaVA's ``eval_pope.py`` does. Metrics:
    ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` (all in %, "yes" positive),
    and the same per category with ``mean_f1`` over categories.
``mme``
    Rows ``{"question_id", "category", "image", "answer": "Yes"|"No"}`` (``"label"`` works too;
    ``image`` defaults to the question id up to a ``#``), or the MME release folder itself
    (``MME_Benchmark_release_version``: ``<category>/[questions_answers_YN/]<image>.txt`` files of
    ``question<TAB>answer`` lines), in which case answers are matched by category and image (from
    the answer's metadata or a ``category/.../image.ext`` question id) and by their prompt.
    Per subtask ``acc`` (% of questions) + ``acc+`` (% of images with every question right);
    ``perception`` and ``cognition`` sum the subtask scores of MME's two lists.
``mmbench``
    MMBench's TSV (``index``, ``question``, ``A``..``D``, ``answer``, ``category``, ...; the image
    column is ignored) or rows ``{"question_id" (or "index"), "answer": letter, "category",
    "options": [...] or "A".."D", "g_index" (optional)}``. Circular evaluation: rows whose index
    differs by a multiple of 1,000,000 (``g_index = index % 1e6``, VLMEvalKit's convention; see
    ``circular_variants``) are the circular shifts of one question, which counts as correct only if
    every shift is. The option letter is parsed from the free-text answer
    (``normalize.parse_option_letter``). Metrics: ``circular_accuracy`` (the MMBench score),
    ``vanilla_accuracy`` (per row), ``per_category`` (circular).
``scienceqa_img``
    ScienceQA's ``problems.json`` (``{pid: {"choices": [...], "answer": index, "image": name|null,
    ...}}``) or rows ``{"question_id", "choices", "answer": index or letter, "image"}``. The letter
    is parsed as for MMBench (LLaVA's ``eval_science_qa.py`` rules plus option text). Metrics:
    ``img_accuracy`` (questions with an image: the ScienceQA-IMG score), ``accuracy`` (all).
"""

from __future__ import annotations

import csv
import json
import re
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenpacker_llava.evaluation.normalize import (
    OPTION_LETTERS,
    normalize_gqa_answer,
    parse_mme_answer,
    parse_option_letter,
    parse_yes_no,
    textvqa_accuracy,
    vqav2_accuracy,
)
from tokenpacker_llava.registry import Registry

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
CIRCULAR_OFFSET = 1_000_000


class AnnotationError(ValueError):
    """An annotation (or answer) file that does not fit the benchmark; the message names the row."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _key(value: Any) -> str:
    return str(value)


def _json_lines(path: Path, lines: Sequence[str]) -> list[Any]:
    """The values of JSON-lines text, an error naming the file and line of the first bad one."""
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise AnnotationError(f"{path.name} line {number}: invalid JSON ({error.msg})") from None
    return rows


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an annotation file: JSON lines, a JSON list, a JSON object keyed by question id
    (the key becomes ``question_id`` unless the row has one), an official ``{"annotations": [...]}``
    / ``{"data": [...]}`` wrapper, or a TSV with a header.

    A ``.json`` file holding JSON lines (POPE's ``coco_pope_*.json``) is read as JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if path.suffix == ".tsv":
        with path.open(encoding="utf-8", newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle, delimiter="\t")]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            rows = _json_lines(path, list(handle))
    else:
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            # Not one JSON document. When its first line is a complete value, it is JSON lines under a
            # .json name (POPE's label files), read as such; otherwise the document's error is reported.
            lines = text.splitlines()
            first = next((number for number, line in enumerate(lines) if line.strip()), 0)
            try:
                json.loads(lines[first] if lines else "")
            except json.JSONDecodeError:
                raise AnnotationError(
                    f"{path.name}: invalid JSON ({error.msg} at line {error.lineno})"
                ) from None
            data = _json_lines(path, lines)
        if isinstance(data, dict):
            for wrapper in ("annotations", "data"):
                if isinstance(data.get(wrapper), list):
                    data = data[wrapper]
                    break
        if isinstance(data, dict) and "question_id" in data and not isinstance(data["question_id"], dict):
            data = [data]  # JSON lines with a single row
        if isinstance(data, dict):
            if not all(isinstance(row, dict) for row in data.values()):
                raise AnnotationError(
                    f"{path.name}: expected a list of rows or an object of rows keyed by id"
                )
            data = [
                {"question_id": key, **row} if "question_id" not in row else row for key, row in data.items()
            ]
        rows = data
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise AnnotationError(f"{path.name}: expected rows that are JSON objects")
    return rows


def _index(rows: Sequence[Mapping[str, Any]], source: str, *id_fields: str) -> dict[str, Mapping[str, Any]]:
    """Rows by question id (the first present of ``id_fields``); duplicates and missing ids are errors."""
    id_fields = id_fields or ("question_id",)
    out: dict[str, Mapping[str, Any]] = {}
    for number, row in enumerate(rows):
        value = next((row[field] for field in id_fields if row.get(field) not in (None, "")), None)
        if value is None:
            raise AnnotationError(f"{source} row {number}: no {' or '.join(id_fields)}")
        key = _key(value)
        if key in out:
            raise AnnotationError(f"{source} row {number}: duplicate question id {value!r}")
        out[key] = row
    return out


def load_answers(answers: str | Path | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Answers from an answer file (or as given), each with a ``question_id`` and a string ``text``."""
    if isinstance(answers, (str, Path)):
        from tokenpacker_llava.inference.answer import read_answers

        answers = read_answers(answers)
    seen: set[str] = set()
    for number, answer in enumerate(answers):
        if "question_id" not in answer or not isinstance(answer.get("text"), str):
            raise AnnotationError(f"answer {number}: needs a question_id and a text")
        key = _key(answer["question_id"])
        if key in seen:
            raise AnnotationError(f"answer {number}: question_id {answer['question_id']!r} is answered twice")
        seen.add(key)
    return list(answers)


def _pair(
    answers: Sequence[Mapping[str, Any]], annotations: Mapping[str, Any], benchmark: str, source: str
) -> list[tuple[Mapping[str, Any], Any]]:
    pairs, missing = [], []
    for answer in answers:
        annotation = annotations.get(_key(answer["question_id"]))
        if annotation is None:
            missing.append(answer["question_id"])
        else:
            pairs.append((answer, annotation))
    if missing:
        raise AnnotationError(
            f"{len(missing)} of {len(answers)} answers have no annotation in {source} (e.g. question_id "
            f"{', '.join(map(repr, missing[:3]))}); is it the {benchmark} annotation file for these questions?"
        )
    if not pairs:
        raise AnnotationError(f"no answers to score against {source}")
    return pairs


def _percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


class Benchmark(ABC):
    """Scores an answer file against a benchmark's annotations (see the module docstring)."""

    name: str = ""
    # Appended on its own line to every question by `eval` unless --prompt_suffix says otherwise.
    default_prompt_suffix: str | None = None

    @abstractmethod
    def score(
        self, answers: str | Path | Sequence[Mapping[str, Any]], annotations: str | Path
    ) -> dict[str, Any]:
        """Metrics of ``answers`` against the annotation file ``annotations``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _register(cls: type[Benchmark]) -> type[Benchmark]:
    BENCHMARKS.add(cls.name, cls())
    return cls


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as exactly ``name``; a RegistryError listing the others otherwise."""
    return BENCHMARKS.get(name)


def score_answers(benchmark: str, answers: str | Path, annotations: str | Path) -> dict[str, Any]:
    return get_benchmark(benchmark).score(answers, annotations)


def _answer_strings(raw: Any, source: str, question_id: Any) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise AnnotationError(f"{source}: question {question_id!r} needs a non-empty list of answers")
    out = []
    for item in raw:
        value = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(value, str):
            raise AnnotationError(f"{source}: question {question_id!r} has a non-string answer {item!r}")
        out.append(value)
    return out


@_register
class VQAv2(Benchmark):
    name = "vqav2"

    def score(self, answers, annotations):
        rows = _index(load_rows(annotations), Path(annotations).name)
        pairs = _pair(load_answers(answers), rows, self.name, Path(annotations).name)
        total, by_type = 0.0, defaultdict(list)
        for answer, row in pairs:
            accuracy = vqav2_accuracy(
                answer["text"],
                _answer_strings(row.get("answers"), Path(annotations).name, answer["question_id"]),
            )
            total += accuracy
            if row.get("answer_type"):
                by_type[row["answer_type"]].append(accuracy)
        return {
            "accuracy": _percent(total, len(pairs)),
            "per_answer_type": {kind: _percent(sum(v), len(v)) for kind, v in sorted(by_type.items())},
            "num_questions": len(pairs),
            "num_unanswered": len(rows) - len(pairs),
        }


@_register
class GQA(Benchmark):
    name = "gqa"

    def score(self, answers, annotations):
        source = Path(annotations).name
        rows = _index(load_rows(annotations), source)
        answered = _pair(load_answers(answers), rows, self.name, source)
        pairs = [(answer, row) for answer, row in answered if row.get("isBalanced", True) is not False]
        correct, kinds = 0, defaultdict(list)
        for answer, row in pairs:
            if not isinstance(row.get("answer"), str):
                raise AnnotationError(f"{source}: question {answer['question_id']!r} has no string 'answer'")
            hit = normalize_gqa_answer(answer["text"]) == row["answer"].strip().lower()
            correct += hit
            structural = (row.get("types") or {}).get("structural")
            if structural:
                kinds["open" if structural == "query" else "binary"].append(hit)
        metrics = {
            "accuracy": _percent(correct, len(pairs)),
            "num_questions": len(pairs),
            # Unbalanced questions are left out of the score, answered or not.
            "num_unanswered": len(rows) - len(answered),
        }
        for kind, hits in sorted(kinds.items()):
            metrics[kind] = _percent(sum(hits), len(hits))
        return metrics


@_register
class TextVQA(Benchmark):
    name = "textvqa"

    def score(self, answers, annotations):
        source = Path(annotations).name
        rows = _index(load_rows(annotations), source)
        pairs = _pair(load_answers(answers), rows, self.name, source)
        total = sum(
            textvqa_accuracy(
                answer["text"], _answer_strings(row.get("answers"), source, answer["question_id"])
            )
            for answer, row in pairs
        )
        return {
            "accuracy": _percent(total, len(pairs)),
            "num_questions": len(pairs),
            "num_unanswered": len(rows) - len(pairs),
        }


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 ("yes" positive) and the share of "yes" answers, in %."""
    tp = sum(1 for p, label in zip(predictions, labels, strict=True) if p == "yes" and label == "yes")
    fp = sum(1 for p, label in zip(predictions, labels, strict=True) if p == "yes" and label == "no")
    tn = sum(1 for p, label in zip(predictions, labels, strict=True) if p == "no" and label == "no")
    fn = sum(1 for p, label in zip(predictions, labels, strict=True) if p == "no" and label == "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _percent(tp + tn, len(labels)),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": _percent(predictions.count("yes"), len(predictions)),
        "num_questions": len(labels),
    }


@_register
class POPE(Benchmark):
    name = "pope"

    def score(self, answers, annotations):
        source = Path(annotations).name
        rows = _index(load_rows(annotations), source)
        pairs = _pair(load_answers(answers), rows, self.name, source)
        predictions, labels, categories = [], [], []
        for answer, row in pairs:
            label = str(row.get("label", row.get("answer", ""))).strip().lower()
            if label not in ("yes", "no"):
                raise AnnotationError(
                    f"{source}: question {answer['question_id']!r} has label {label!r}, not yes/no"
                )
            predictions.append(parse_yes_no(answer["text"]))
            labels.append(label)
            categories.append(row.get("category") or (answer.get("metadata") or {}).get("category"))
        metrics: dict[str, Any] = binary_metrics(predictions, labels)
        metrics["num_unanswered"] = len(rows) - len(pairs)
        if any(category is not None for category in categories):
            per = {}
            for category in sorted({c for c in categories if c is not None}):
                chosen = [i for i, c in enumerate(categories) if c == category]
                per[category] = binary_metrics([predictions[i] for i in chosen], [labels[i] for i in chosen])
            metrics["per_category"] = per
            metrics["mean_f1"] = sum(m["f1"] for m in per.values()) / len(per)
        return metrics


MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# MME's files end each question with "Please answer yes or no."; LLaVA's (and lmms-eval's) MME
# prompts replace that with a line asking for a short answer, and LLaVA's convert_answer_to_mme.py
# puts it back before the lookup. Matching drops both phrases from both sides instead.
_MME_INSTRUCTIONS = re.compile(
    r"please\s+answer\s+yes\s+or\s+no\.?|answer\s+the\s+question\s+using\s+a\s+single\s+word\s+or\s+phrase\.?",
    re.IGNORECASE,
)


def _mme_question(text: str) -> str:
    """A question as MME's files and LLaVA's prompts both write it, for matching: the yes/no and
    short-answer instructions and ``<image>`` removed, whitespace collapsed, lower-cased."""
    return " ".join(_MME_INSTRUCTIONS.sub(" ", text.replace("<image>", " ")).split()).lower()


def _stem(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _mme_folder(root: Path) -> dict[tuple[str, str, str], str]:
    """(category, image stem, question) -> "yes"/"no" from the MME release folder."""
    out = {}
    for category_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        category = category_dir.name
        if category not in MME_PERCEPTION + MME_COGNITION:
            continue
        txt_dir = category_dir / "questions_answers_YN"
        for txt in sorted((txt_dir if txt_dir.is_dir() else category_dir).glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    raise AnnotationError(f"{txt} line {number}: expected 'question<TAB>answer'")
                out[(category, txt.stem, _mme_question(parts[0]))] = parts[1].strip().lower()
    if not out:
        raise AnnotationError(f"{root} holds no MME category folders with question files")
    return out


@_register
class MME(Benchmark):
    name = "mme"

    def _pairs(self, answers, annotations) -> list[tuple[str, str, str, str]]:
        """(category, image, prediction, label) per answer."""
        annotations = Path(annotations)
        answers = load_answers(answers)
        out = []
        if annotations.is_dir():
            table = _mme_folder(annotations)
            for answer in answers:
                metadata = answer.get("metadata") or {}
                qid = str(answer["question_id"]).split("#")[0]
                category = metadata.get("category") or qid.replace("\\", "/").split("/")[0]
                image = _stem(metadata.get("image") or qid)
                key = (category, image, _mme_question(answer.get("prompt", "")))
                if key not in table:
                    raise AnnotationError(
                        f"answer {answer['question_id']!r}: no MME question for category {category!r}, image "
                        f"{image!r} and prompt {answer.get('prompt', '')!r} in {annotations}"
                    )
                out.append((category, f"{category}/{image}", answer["text"], table[key]))
            return out
        rows = _index(load_rows(annotations), annotations.name)
        for answer, row in _pair(answers, rows, self.name, annotations.name):
            label = str(row.get("answer", row.get("label", ""))).strip().lower()
            category = row.get("category")
            if label not in ("yes", "no") or not category:
                raise AnnotationError(
                    f"{annotations.name}: question {answer['question_id']!r} needs a category and a yes/no answer"
                )
            image = row.get("image") or str(row["question_id"]).split("#")[0]
            out.append((category, f"{category}/{image}", answer["text"], label))
        return out

    def score(self, answers, annotations):
        by_category: dict[str, list[tuple[str, bool]]] = defaultdict(list)
        for category, image, text, label in self._pairs(answers, annotations):
            if category not in MME_PERCEPTION + MME_COGNITION:
                raise AnnotationError(
                    f"unknown MME subtask {category!r}; MME's are {', '.join(MME_PERCEPTION + MME_COGNITION)}"
                )
            by_category[category].append((image, parse_mme_answer(text) == label))
        subtasks = {}
        for category, results in by_category.items():
            images: dict[str, list[bool]] = defaultdict(list)
            for image, hit in results:
                images[image].append(hit)
            accuracy = _percent(sum(hit for _, hit in results), len(results))
            accuracy_plus = _percent(sum(all(hits) for hits in images.values()), len(images))
            subtasks[category] = {
                "acc": accuracy,
                "acc_plus": accuracy_plus,
                "score": accuracy + accuracy_plus,
                "num_questions": len(results),
                "num_images": len(images),
            }
        return {
            "perception": sum(subtasks[c]["score"] for c in MME_PERCEPTION if c in subtasks),
            "cognition": sum(subtasks[c]["score"] for c in MME_COGNITION if c in subtasks),
            "subtasks": {c: subtasks[c] for c in MME_PERCEPTION + MME_COGNITION if c in subtasks},
            "num_questions": sum(len(v) for v in by_category.values()),
        }


def _option_letter(value: Any, num_options: int) -> str | None:
    """``value`` as one option letter among the first ``num_options`` (whitespace trimmed); None when
    it is anything else (missing, empty, several letters, not a string)."""
    if not isinstance(value, str):
        return None
    letter = value.strip()
    return letter if len(letter) == 1 and letter in OPTION_LETTERS[:num_options] else None


def _row_options(row: Mapping[str, Any]) -> list[str]:
    """The options of an MMBench row: ``options``/``choices`` or the non-empty A, B, ... columns."""
    options = row.get("options", row.get("choices"))
    if isinstance(options, list):
        return [str(option) for option in options]
    out = []
    for letter in OPTION_LETTERS:
        value = row.get(letter)
        if value is None or (isinstance(value, str) and not value.strip()) or value != value:  # NaN
            break
        out.append(str(value))
    return out


def circular_variants(
    index: int, question: Mapping[str, Any], options: Sequence[str], answer: str
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The circular shifts of one MMBench question, as (question row, annotation row) pairs.

    Shift k moves every option k places up (option k becomes A) and has index ``index + k *
    1,000,000``; the annotation's letter follows the right option.
    """
    if index >= CIRCULAR_OFFSET:
        raise ValueError(f"MMBench indices must be below {CIRCULAR_OFFSET} to leave room for circular shifts")
    if _option_letter(answer, len(options)) is None:
        raise ValueError(
            f"MMBench question {index}: answer {answer!r} is not one of the {len(options)} option letters"
        )
    correct = OPTION_LETTERS.index(answer.strip())
    out = []
    for shift in range(len(options)):
        rotated = list(options[shift:]) + list(options[:shift])
        qid = index + shift * CIRCULAR_OFFSET
        letter = OPTION_LETTERS[(correct - shift) % len(options)]
        out.append(
            (
                {**question, "question_id": qid, "options": rotated},
                {
                    "question_id": qid,
                    "answer": letter,
                    "options": rotated,
                    "category": question.get("category"),
                },
            )
        )
    return out


@_register
class MMBench(Benchmark):
    name = "mmbench"
    default_prompt_suffix = LETTER_PROMPT

    def score(self, answers, annotations):
        source = Path(annotations).name
        rows = _index(load_rows(annotations), source, "question_id", "index")
        pairs = _pair(load_answers(answers), rows, self.name, source)
        groups: dict[str, list[bool]] = defaultdict(list)
        group_category: dict[str, str | None] = {}
        for answer, row in pairs:
            options = _row_options(row)
            truth = _option_letter(row.get("answer"), len(options))
            if not options or truth is None:
                raise AnnotationError(
                    f"{source}: question {answer['question_id']!r} needs options and an answer letter among "
                    f"them, has {len(options)} options and answer {row.get('answer')!r} (MMBench's test "
                    "split has no answers: score it on the MMBench server)"
                )
            hit = parse_option_letter(answer["text"], options) == truth
            if row.get("g_index") not in (None, ""):
                group = _key(row["g_index"])
            else:
                try:
                    group = str(int(float(answer["question_id"])) % CIRCULAR_OFFSET)
                except ValueError:
                    group = _key(answer["question_id"])
            groups[group].append(hit)
            group_category.setdefault(group, row.get("category"))
        circular = {group: all(hits) for group, hits in groups.items()}
        per_category: dict[str, list[bool]] = defaultdict(list)
        for group, hit in circular.items():
            if group_category[group]:
                per_category[group_category[group]].append(hit)
        return {
            "circular_accuracy": _percent(sum(circular.values()), len(circular)),
            "vanilla_accuracy": _percent(sum(sum(h) for h in groups.values()), len(pairs)),
            "per_category": {c: _percent(sum(h), len(h)) for c, h in sorted(per_category.items())},
            "num_questions": len(circular),
            "num_rows": len(pairs),
            "num_unanswered": len(rows) - len(pairs),
        }


@_register
class ScienceQAImg(Benchmark):
    name = "scienceqa_img"
    default_prompt_suffix = LETTER_PROMPT

    def score(self, answers, annotations):
        source = Path(annotations).name
        rows = _index(load_rows(annotations), source)
        pairs = _pair(load_answers(answers), rows, self.name, source)
        hits, image_hits = [], []
        for answer, row in pairs:
            choices = row.get("choices")
            if not isinstance(choices, list) or not choices:
                raise AnnotationError(f"{source}: problem {answer['question_id']!r} has no choices")
            truth = row.get("answer")
            if isinstance(truth, int) and not isinstance(truth, bool) and 0 <= truth < len(choices):
                truth = OPTION_LETTERS[truth]
            truth = _option_letter(truth, len(choices))
            if truth is None:
                raise AnnotationError(
                    f"{source}: problem {answer['question_id']!r} has answer {row.get('answer')!r}, not a "
                    f"choice index or letter among its {len(choices)} choices"
                )
            hit = parse_option_letter(answer["text"], [str(c) for c in choices]) == truth
            hits.append(hit)
            has_image = row["image"] if "image" in row else (answer.get("metadata") or {}).get("image")
            if has_image:
                image_hits.append(hit)
        return {
            "img_accuracy": _percent(sum(image_hits), len(image_hits)),
            "accuracy": _percent(sum(hits), len(hits)),
            "num_img_questions": len(image_hits),
            "num_questions": len(hits),
            "num_unanswered": len(rows) - len(pairs),
        }
