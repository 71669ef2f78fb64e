"""Benchmark scorers on small hand-made answer and annotation files whose scores are computed by
hand (in the comments), the answer normalizations and parsers, and the lmms-eval adapter's
registration."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import pytest

from tokenpacker_llava.evaluation import BENCHMARKS, AnnotationError, get_benchmark, score_answers
from tokenpacker_llava.evaluation.benchmarks import Benchmark, circular_variants
from tokenpacker_llava.evaluation.normalize import (
    normalize_evalai_answer,
    normalize_gqa_answer,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_option_letter,
    parse_yes_no,
    vqa_soft_accuracy,
    vqav2_accuracy,
)
from tokenpacker_llava.registry import RegistryError


def write_answers(path: Path, answers: dict) -> Path:
    """An answer .jsonl from {question_id: text} (or {question_id: (text, metadata)})."""
    lines = []
    for qid, value in answers.items():
        text, metadata = value if isinstance(value, tuple) else (value, {})
        lines.append(json.dumps({"question_id": qid, "prompt": "", "text": text, "metadata": metadata}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------------------------
# Normalization and parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # number words -> digits (after lower-casing)
        ("none", "0"),
        ("2.", "2"),  # a period not followed by a digit is dropped
        ("2.5", "2.5"),  # ... one followed by a digit is kept
        ("It is 3.", "it is 3"),
        ("The Cat!", "cat"),  # articles and capitals
        ("a man's hat", "man's hat"),
        ("dont", "don't"),  # contractions table
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
        ("black and white", "black and white"),
        ("T-shirt", "t shirt"),  # a mark not next to a space becomes a space
        ("yes , it is", "yes it is"),  # ... one next to a space is deleted
        ("  red\tcar\n", "red car"),
    ],
)
def test_official_vqa_normalization(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


def test_evalai_normalization_also_drops_commas_and_question_marks_and_splits_possessives() -> None:
    assert normalize_evalai_answer("Coca-Cola") == "coca cola"
    assert normalize_evalai_answer("The Nike?") == "nike"
    assert normalize_evalai_answer("John's") == "john 's"
    assert normalize_evalai_answer("Three") == "3"


def test_soft_accuracy_averages_over_leave_one_out_subsets() -> None:
    # k of 10 annotators agree with the prediction: the k subsets without one of them have k - 1
    # matches, the 10 - k others k matches; each capped at 3 and divided by 3.
    assert vqa_soft_accuracy("a", ["a"] + ["b"] * 9) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_soft_accuracy("a", ["a"] * 2 + ["b"] * 8) == pytest.approx((2 / 3 + 16 / 3) / 10)  # 0.6
    assert vqa_soft_accuracy("a", ["a"] * 3 + ["b"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)  # 0.9
    assert vqa_soft_accuracy("a", ["a"] * 4 + ["b"] * 6) == 1.0
    assert vqa_soft_accuracy("c", ["a"] * 10) == 0.0
    # Ground truth is used as released (punctuation-processed only when annotators disagree).
    assert vqav2_accuracy("Two", ["2"] * 10) == 1.0
    assert vqav2_accuracy("two", ["two"] * 10) == 0.0  # the prediction became "2"


def test_gqa_normalization() -> None:
    assert normalize_gqa_answer(" Yes. ") == "yes"
    assert normalize_gqa_answer("The   Left.") == "the left"  # GQA matches exactly: articles stay


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a cat in the image.", "no"),
        ("Yes. No dogs though.", "yes"),  # only the first sentence counts
        ("I don't think so.", "yes"),  # LLaVA's rule looks for the words No / no / not only
        ("no", "no"),
    ],
)
def test_pope_yes_no_parsing(text: str, parsed: str) -> None:
    assert parse_yes_no(text) == parsed


def test_mme_answer_parsing() -> None:
    assert parse_mme_answer("Yes") == "yes"
    assert parse_mme_answer("No, it is not.") == "no"
    assert parse_mme_answer("yes, there is") == "yes"
    assert parse_mme_answer("There are two") == "other"  # only the first four characters are searched


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("D) fish", "D"),
        ("C. bird", "C"),
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("I think it is B", "B"),
        ("the dog", "B"),  # the text of exactly one option
        ("a dog or a cat", None),  # two options named
        ("Apple", None),
        ("E", None),  # not among the 4 options
        ("", None),
    ],
)
def test_option_letter_parsing(text: str, letter: str | None) -> None:
    assert parse_option_letter(text, ["cat", "dog", "bird", "fish"]) == letter


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_benchmarks_are_registered_by_exact_name() -> None:
    assert BENCHMARKS.names() == ["gqa", "mmbench", "mme", "pope", "scienceqa_img", "textvqa", "vqav2"]
    assert isinstance(get_benchmark("vqav2"), Benchmark)
    with pytest.raises(RegistryError, match="unknown benchmark 'vqa'; available: gqa, mmbench, mme"):
        get_benchmark("vqa")  # no substring matching
    with pytest.raises(RegistryError, match="already registered"):
        BENCHMARKS.add("pope", get_benchmark("gqa"))


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def test_vqav2(tmp_path: Path) -> None:
    def annotation(qid, answers, answer_type):
        return {
            "question_id": qid,
            "answer_type": answer_type,
            "question_type": "what",
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
            ],
        }

    official = {
        "info": {},
        "annotations": [
            annotation(1, ["2"] * 2 + ["3"] * 8, "number"),  # "Two." -> "2": 2 of 10 agree -> 0.6
            annotation(2, ["dog"] * 10, "other"),  # "The dog" -> "dog" -> 1.0
            annotation(3, ["2.5"] * 10, "number"),  # "2." -> "2" != "2.5" -> 0.0
            annotation(4, ["yes"] * 3 + ["no"] * 7, "yes/no"),  # "Yes" -> 3 of 10 -> 0.9
            annotation(5, ["don't know"] * 10, "other"),  # "dont know" -> "don't know" -> 1.0
            # Disagreeing annotators are punctuation-processed: both become "t shirt"; "T-shirt" too -> 1.0
            annotation(6, ["t-shirt"] * 5 + ["t shirt"] * 5, "other"),
            annotation(7, ["cat"] * 10, "other"),  # not answered: only counted
        ],
    }
    annotations = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps(official))
    answers = write_answers(
        tmp_path / "answers.jsonl",
        {1: "Two.", 2: "The dog", 3: "2.", 4: "Yes", 5: "dont know", 6: "T-shirt"},
    )
    metrics = score_answers("vqav2", answers, annotations)
    assert metrics["accuracy"] == pytest.approx(100 * (0.6 + 1 + 0 + 0.9 + 1 + 1) / 6)  # 75.0
    assert metrics["per_answer_type"] == pytest.approx({"number": 30.0, "other": 100.0, "yes/no": 90.0})
    assert metrics["num_questions"] == 6 and metrics["num_unanswered"] == 1

    # The simple row format (answers as strings) scores the same.
    rows = [
        {"question_id": a["question_id"], "answers": [x["answer"] for x in a["answers"]]}
        for a in official["annotations"]
    ]
    simple = write_jsonl(tmp_path / "vqav2.jsonl", rows)
    assert score_answers("vqav2", answers, simple)["accuracy"] == pytest.approx(75.0)


def test_gqa(tmp_path: Path) -> None:
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(
        json.dumps(
            {
                "q1": {"answer": "yes", "types": {"structural": "verify"}, "isBalanced": True},
                "q2": {"answer": "left", "types": {"structural": "query"}, "isBalanced": True},
                "q3": {"answer": "red", "types": {"structural": "query"}, "isBalanced": True},
                "q4": {"answer": "no", "types": {"structural": "logical"}, "isBalanced": False},
            }
        )
    )
    # q1 "Yes." -> "yes" right; q2 "Left" right; q3 "The red." -> "the red" wrong (exact match);
    # q4 is not balanced and not scored.
    answers = write_answers(tmp_path / "a.jsonl", {"q1": "Yes.", "q2": "Left", "q3": "The red.", "q4": "no"})
    metrics = score_answers("gqa", answers, annotations)
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert metrics["binary"] == 100.0 and metrics["open"] == 50.0
    assert metrics["num_questions"] == 3 and metrics["num_unanswered"] == 0  # q4 was answered


def test_textvqa(tmp_path: Path) -> None:
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(
        json.dumps(
            {
                "dataset_name": "textvqa",
                "data": [
                    {"question_id": 1, "answers": ["coca cola"] * 10},  # "Coca-Cola" -> "coca cola": 1.0
                    {"question_id": 2, "answers": ["nike"] * 2 + ["adidas"] * 8},  # "the Nike" -> 0.6
                    {"question_id": 3, "answers": ["three"] * 3 + ["5"] * 7},  # "3" vs "three" -> "3": 0.9
                ],
            }
        )
    )
    answers = write_answers(tmp_path / "a.jsonl", {1: "Coca-Cola", 2: "the Nike", 3: "3"})
    metrics = score_answers("textvqa", answers, annotations)
    assert metrics["accuracy"] == pytest.approx(100 * 2.5 / 3)


def test_pope(tmp_path: Path) -> None:
    labels = write_jsonl(
        tmp_path / "pope_labels.jsonl",
        [
            {"question_id": 1, "label": "yes", "category": "adversarial"},
            {"question_id": 2, "label": "yes", "category": "adversarial"},
            {"question_id": 3, "label": "no", "category": "adversarial"},
            {"question_id": 4, "label": "no", "category": "adversarial"},
            {"question_id": 5, "label": "yes", "category": "random"},
            {"question_id": 6, "label": "no", "category": "random"},
        ],
    )
    answers = write_answers(
        tmp_path / "a.jsonl",
        {
            1: "Yes, there is a dog.",  # yes: TP
            2: "No.",  # no: FN
            3: "There is not a cat in the image.",  # no: TN
            4: "Yes",  # yes: FP
            5: "yes",  # yes: TP
            6: "I don't think so. No.",  # yes (LLaVA's rule): FP
        },
    )
    metrics = score_answers("pope", answers, labels)
    # TP 2, FP 2, TN 1, FN 1.
    assert metrics["accuracy"] == pytest.approx(50.0)
    assert metrics["precision"] == pytest.approx(50.0)
    assert metrics["recall"] == pytest.approx(200 / 3)
    assert metrics["f1"] == pytest.approx(100 * 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # 57.14
    assert metrics["yes_ratio"] == pytest.approx(400 / 6)
    adversarial, random = metrics["per_category"]["adversarial"], metrics["per_category"]["random"]
    assert adversarial == pytest.approx(
        {"accuracy": 50, "precision": 50, "recall": 50, "f1": 50, "yes_ratio": 50, "num_questions": 4}
    )
    assert random["precision"] == 50 and random["recall"] == 100 and random["f1"] == pytest.approx(200 / 3)
    assert metrics["mean_f1"] == pytest.approx((50 + 200 / 3) / 2)


def test_pope_label_files_are_json_lines_despite_their_json_name(tmp_path: Path) -> None:
    """POPE's official ``coco_pope_*.json`` files are JSON lines."""
    labels = tmp_path / "coco_pope_adversarial.json"
    labels.write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}\n'
        '{"question_id": 2, "image": "a.jpg", "text": "Is there a cat?", "label": "no"}\n'
    )
    answers = write_answers(tmp_path / "a.jsonl", {1: "Yes", 2: "Yes"})
    metrics = score_answers("pope", answers, labels)
    assert metrics["accuracy"] == 50.0 and metrics["num_questions"] == 2
    one_row = tmp_path / "coco_pope_random.json"
    one_row.write_text('{"question_id": 1, "label": "yes"}\n')
    assert score_answers("pope", write_answers(tmp_path / "b.jsonl", {1: "yes"}), one_row)["accuracy"] == 100
    # Errors still name the file and the line.
    labels.write_text(
        '{"question_id": 1, "label": "yes"}\n{"question_id": 2, "label": "no"}\n{"question_id": 3,\n'
    )
    with pytest.raises(AnnotationError, match="coco_pope_adversarial.json line 3: invalid JSON"):
        score_answers("pope", answers, labels)
    labels.write_text('[\n  {"question_id": 1, "label": "yes"}\n]\n]\n')  # one document, then junk
    with pytest.raises(AnnotationError, match="coco_pope_adversarial.json: invalid JSON .* at line 4"):
        score_answers("pope", answers, labels)


def test_mme(tmp_path: Path) -> None:
    rows = [
        ("existence/1.png#1", "existence", "1.png", "Yes", "Yes"),  # right
        ("existence/1.png#2", "existence", "1.png", "No", "No, there is not."),  # right: image 1 fully right
        ("existence/2.png#1", "existence", "2.png", "Yes", "yes"),  # right
        ("existence/2.png#2", "existence", "2.png", "No", "Yes"),  # wrong
        ("count/3.png#1", "count", "3.png", "Yes", "There are two"),  # "other": wrong
        ("count/3.png#2", "count", "3.png", "No", "no"),  # right
        ("code_reasoning/4.png#1", "code_reasoning", "4.png", "Yes", "Yes"),
        ("code_reasoning/4.png#2", "code_reasoning", "4.png", "No", "No"),
    ]
    annotations = write_jsonl(
        tmp_path / "mme.jsonl",
        [{"question_id": q, "category": c, "image": i, "answer": a} for q, c, i, a, _ in rows],
    )
    answers = write_answers(tmp_path / "a.jsonl", {q: text for q, _, _, _, text in rows})
    metrics = score_answers("mme", answers, annotations)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; count: 50 + 0 -> 50; code_reasoning: 200.
    assert metrics["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert metrics["subtasks"]["count"] == pytest.approx(
        {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "num_questions": 2, "num_images": 1}
    )
    assert metrics["perception"] == pytest.approx(175.0)
    assert metrics["cognition"] == pytest.approx(200.0)
    assert list(metrics["subtasks"]) == ["existence", "count", "code_reasoning"]  # MME's order


def test_mme_release_folder(tmp_path: Path) -> None:
    """The MME release layout: <category>/questions_answers_YN/<image>.txt or <category>/<image>.txt."""
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence" / "questions_answers_YN").mkdir(parents=True)
    (root / "existence" / "questions_answers_YN" / "1.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n"
    )
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0020.txt").write_text("Is the output 2? Please answer yes or no.\tNo\n")
    suffix = "\nAnswer the question using a single word or phrase."  # as LLaVA's MME prompts end
    answers = tmp_path / "a.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": qid, "prompt": prompt + suffix, "text": text}) + "\n"
            for qid, prompt, text in [
                ("existence/1.jpg#1", "Is there a dog in this image? Please answer yes or no.", "Yes"),
                ("existence/1.jpg#2", "Is there a cat in this image?  Please answer yes or no.", "Yes"),
                ("code_reasoning/0020.png", "Is the output 2? Please answer yes or no.", "No"),
            ]
        )
    )
    metrics = score_answers("mme", answers, root)
    assert metrics["subtasks"]["existence"]["score"] == pytest.approx(50.0)  # acc 50, acc+ 0
    assert metrics["cognition"] == pytest.approx(200.0)
    bad = write_answers(tmp_path / "bad.jsonl", {"existence/9.jpg": "Yes"})
    with pytest.raises(AnnotationError, match="no MME question for category 'existence', image '9'"):
        score_answers("mme", bad, root)


def test_mme_release_folder_matches_llava_prompts_without_the_yes_no_instruction(tmp_path: Path) -> None:
    """LLaVA / lmms-eval replace MME's "Please answer yes or no." by the short-answer line; the ground
    truth is still found (LLaVA's convert_answer_to_mme.py puts the phrase back before its lookup)."""
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "1.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? please answer Yes or No. \tNo\n"
    )
    answers = tmp_path / "a.jsonl"
    answers.write_text(
        "".join(
            json.dumps({"question_id": qid, "prompt": prompt, "text": text}) + "\n"
            for qid, prompt, text in [
                (
                    "existence/1.jpg#1",
                    "Is there a dog in this image?\nAnswer the question using a single word or phrase.",
                    "Yes",
                ),
                (
                    "existence/1.jpg#2",
                    "<image>\nIs there a cat in this image?\nanswer the question using a "
                    "single word or phrase. ",
                    "No",
                ),
            ]
        )
    )
    metrics = score_answers("mme", answers, root)
    assert metrics["subtasks"]["existence"] == pytest.approx(
        {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "num_questions": 2, "num_images": 1}
    )


def mmbench_files(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    questions, annotations = [], []
    for index, options, answer, category in [
        (7, ["cat", "dog", "bird"], "B", "animals"),
        (8, ["red", "blue"], "A", "colours"),
    ]:
        question = {"text": "Which one?", "image": f"{index}.png", "category": category}
        for q, a in circular_variants(index, question, options, answer):
            questions.append(q)
            annotations.append(a)
    return questions, annotations


def test_circular_variants() -> None:
    questions, annotations = mmbench_files(Path("."))
    assert [q["question_id"] for q in questions] == [7, 1_000_007, 2_000_007, 8, 1_000_008]
    assert [q["options"] for q in questions[:3]] == [
        ["cat", "dog", "bird"],
        ["dog", "bird", "cat"],
        ["bird", "cat", "dog"],
    ]
    assert [a["answer"] for a in annotations] == ["B", "A", "C", "A", "B"]  # always "dog" / "red"


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_mmbench_circular(tmp_path: Path, fmt: str) -> None:
    _, rows = mmbench_files(tmp_path)
    if fmt == "jsonl":
        annotations = write_jsonl(tmp_path / "mmbench.jsonl", rows)
    else:  # MMBench's own TSV layout: index, question, A..D, answer, category
        annotations = tmp_path / "mmbench_dev_en.tsv"
        with annotations.open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
            for row in rows:
                options = row["options"] + [""] * (4 - len(row["options"]))
                writer.writerow(
                    [row["question_id"], "Which one?", "", *options, row["answer"], row["category"], "b64"]
                )
    answers = write_answers(
        tmp_path / "a.jsonl",
        {
            7: "B",  # right
            1_000_007: "The answer is A.",  # right
            2_000_007: "dog",  # option text -> C: right, so question 7 counts
            8: "A",  # right
            1_000_008: "A. blue",  # wrong (B): question 8 does not count
        },
    )
    metrics = score_answers("mmbench", answers, annotations)
    assert metrics["circular_accuracy"] == 50.0
    assert metrics["vanilla_accuracy"] == 80.0
    assert metrics["per_category"] == {"animals": 100.0, "colours": 0.0}
    assert metrics["num_questions"] == 2 and metrics["num_rows"] == 5


@pytest.mark.parametrize("truth", ["", "AB", None, "E", 1])
def test_mmbench_needs_one_answer_letter_per_row(tmp_path: Path, truth) -> None:
    """An empty answer (MMBench's test split), several letters, null or a letter past the options
    is an annotation error naming the row, not a silent 0% or a TypeError."""
    rows = [
        {"question_id": 7, "options": ["cat", "dog"], "answer": "A"},
        {"question_id": 8, "options": ["cat", "dog", "bird"], "answer": truth},
    ]
    annotations = write_jsonl(tmp_path / "mmbench.jsonl", rows)
    answers = write_answers(tmp_path / "a.jsonl", {7: "A", 8: "A"})
    with pytest.raises(AnnotationError, match=f"question 8 needs options and an answer letter .* {truth!r}"):
        score_answers("mmbench", answers, annotations)
    if isinstance(truth, str):
        with pytest.raises(ValueError, match="not one of the 3 option letters"):
            circular_variants(8, {}, ["cat", "dog", "bird"], truth)


def test_scienceqa_img(tmp_path: Path) -> None:
    problems = tmp_path / "problems.json"
    problems.write_text(
        json.dumps(
            {
                "p1": {
                    "question": "?",
                    "choices": ["a", "b", "c"],
                    "answer": 1,
                    "image": "image.png",
                    "split": "test",
                },
                "p2": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None, "split": "test"},
                "p3": {
                    "question": "?",
                    "choices": ["yes", "no"],
                    "answer": 1,
                    "image": "image.png",
                    "split": "test",
                },
                "p4": {
                    "question": "?",
                    "choices": ["u", "v", "w"],
                    "answer": 2,
                    "image": "image.png",
                    "split": "test",
                },
            }
        )
    )
    # p1 right (image), p2 right (no image), p3 wrong (image), p4 right (image).
    answers = write_answers(
        tmp_path / "a.jsonl", {"p1": "B", "p2": "A", "p3": "The answer is A.", "p4": "C. w"}
    )
    metrics = score_answers("scienceqa_img", answers, problems)
    assert metrics["img_accuracy"] == pytest.approx(200 / 3)
    assert metrics["accuracy"] == 75.0
    assert metrics["num_img_questions"] == 3 and metrics["num_questions"] == 4


@pytest.mark.parametrize("truth", [None, "", "AB", "C", 2, True])
def test_scienceqa_needs_an_answer_among_the_choices(tmp_path: Path, truth) -> None:
    rows = [
        {"question_id": "p1", "choices": ["a", "b"], "answer": "B", "image": "x.png"},
        {"question_id": "p2", "choices": ["a", "b"], "answer": truth, "image": "x.png"},
    ]
    annotations = write_jsonl(tmp_path / "problems.jsonl", rows)
    answers = write_answers(tmp_path / "a.jsonl", {"p1": "B", "p2": "A"})
    with pytest.raises(AnnotationError, match=f"problem 'p2' has answer {truth!r}, not a choice index"):
        score_answers("scienceqa_img", answers, annotations)
    rows[1]["answer"] = " A "  # a letter, whitespace trimmed
    assert (
        score_answers("scienceqa_img", answers, write_jsonl(tmp_path / "ok.jsonl", rows))["accuracy"] == 100
    )


def test_answers_without_annotations_are_an_error(tmp_path: Path) -> None:
    labels = write_jsonl(tmp_path / "labels.jsonl", [{"question_id": 1, "label": "yes"}])
    answers = write_answers(tmp_path / "a.jsonl", {1: "yes", 2: "no", 3: "no"})
    with pytest.raises(AnnotationError, match=r"2 of 3 answers have no annotation .* question_id 2, 3"):
        score_answers("pope", answers, labels)
    duplicate = tmp_path / "dup.jsonl"
    duplicate.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": "1", "text": "no"}\n')
    with pytest.raises(AnnotationError, match="answered twice"):
        score_answers("pope", duplicate, labels)
    bad_label = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "label": "maybe"}])
    with pytest.raises(AnnotationError, match="label 'maybe'"):
        score_answers("pope", write_answers(tmp_path / "b.jsonl", {1: "yes"}), bad_label)


# --------------------------------------------------------------------------------------------
# lmms-eval registration
# --------------------------------------------------------------------------------------------


def test_lmms_eval_adapter_imports_without_lmms_eval_and_registration_says_what_is_missing() -> None:
    from tokenpacker_llava.evaluation import lmms_eval_adapter

    assert "lmms_eval" not in sys.modules
    with pytest.raises(ImportError, match="needs lmms-eval, which is not installed: pip install lmms-eval"):
        lmms_eval_adapter.register_with_lmms_eval()


def test_lmms_eval_registration_makes_an_lmms_subclass(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an lmms-eval-shaped package importable, the adapter registers as an ``lmms`` subclass."""
    import abc

    from tokenpacker_llava.evaluation.lmms_eval_adapter import TokenPackerLlavaLmms, register_with_lmms_eval

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        def __init__(self) -> None:
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    registry: dict[str, type] = {}

    def register_model(*names):
        def decorate(cls):
            assert issubclass(cls, lmms)
            registry.update(dict.fromkeys(names, cls))
            return cls

        return decorate

    package = types.ModuleType("lmms_eval")
    api = types.ModuleType("lmms_eval.api")
    model_module = types.ModuleType("lmms_eval.api.model")
    registry_module = types.ModuleType("lmms_eval.api.registry")
    model_module.lmms = lmms
    registry_module.register_model = register_model
    for name, module in [
        ("lmms_eval", package),
        ("lmms_eval.api", api),
        ("lmms_eval.api.model", model_module),
        ("lmms_eval.api.registry", registry_module),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    cls = register_with_lmms_eval()
    assert registry == {"tokenpacker_llava": cls}
    assert issubclass(cls, TokenPackerLlavaLmms) and issubclass(cls, lmms)
    assert not getattr(cls, "__abstractmethods__", None)  # every abstract method is implemented
