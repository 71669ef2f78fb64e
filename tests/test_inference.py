"""Inference on a tiny model folder built here: loading, chat (single-shot and interactive),
batch answering (batched == unbatched, resume after an interruption, shards + merge), the errors
that name the offending row, the `eval` command, and the lmms-eval adapter's requests."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_text_config, tiny_vision_config, train_sentencepiece
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.data.records import BadSample, Turn
from tokenpacker_llava.data.templates import get_template
from tokenpacker_llava.data.tokenize import IGNORE_INDEX, tokenize_conversation
from tokenpacker_llava.evaluation.benchmarks import score_answers
from tokenpacker_llava.evaluation.lmms_eval_adapter import TokenPackerLlavaLmms
from tokenpacker_llava.inference.answer import (
    QuestionFileError,
    answer_id,
    answer_questions,
    load_questions,
    merge_answer_files,
    read_answers,
    shard_file,
)
from tokenpacker_llava.inference.chat import ChatSession
from tokenpacker_llava.inference.commands import SUBCOMMANDS
from tokenpacker_llava.inference.generation import GenerationSettings, generate
from tokenpacker_llava.inference.loading import load_model
from tokenpacker_llava.tokenization import ensure_image_token

SETTINGS = GenerationSettings(max_new_tokens=6)
QUESTIONS = [
    {"question_id": 1, "image": "red.png", "text": "What colour is the square?"},
    {"question_id": "two", "image": "green_wide.png", "text": "Is it a circle?", "category": "adversarial"},
    {"question_id": 3, "text": "Say hello."},
    {
        "question_id": 4,
        "image": "blue_tall.png",
        "question": "Which colour?",
        "choices": ["red", "green", "blue"],
    },
    {"question_id": 5, "image": "red.png", "text": "<image>\nDescribe the picture."},
    {"question_id": 6, "image": "green_wide.png", "text": "What is in the image?"},
    {"question_id": 7, "image": "blue_tall.png", "text": "Is there a square?", "hint": "Look closely."},
]


def cli(*argv) -> int:
    """Run one of this package's inference subcommands as `tokenpacker-llava ...` would."""
    parser = argparse.ArgumentParser(prog="tokenpacker-llava")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args([str(arg) for arg in argv])
    return args.func(args)


def write_questions(path: Path, rows: list[dict] = QUESTIONS) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model folder as stage 2 saves one (model, tokenizer with <image>, image processor,
    training_config.json naming the template), images and a question file."""
    root = tmp_path_factory.mktemp("inference")
    model_dir = root / "tiny-tokenpacker"
    train_sentencepiece(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_token_id = ensure_image_token(tokenizer)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = TokenPackerLlavaConfig(
        vision_config=tiny_vision_config("clip"),
        text_config=tiny_text_config("llama", vocab_size=400),
        projector_type="tokenpacker",
        scale_factor=2,
        image_token_id=image_token_id,
    )
    TokenPackerLlavaForConditionalGeneration(config).save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size=48).save_pretrained(model_dir)
    (model_dir / "training_config.json").write_text(
        json.dumps({"stage": "finetune", "template": "vicuna_v1"})
    )
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (48, 48), (220, 30, 30)).save(images / "red.png")
    Image.new("RGB", (64, 40), (30, 200, 40)).save(images / "green_wide.png")
    Image.new("RGB", (30, 56), (30, 60, 220)).save(images / "blue_tall.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return {
        "model": model_dir,
        "images": images,
        "questions": write_questions(root / "questions.jsonl"),
    }


@pytest.fixture(scope="module")
def loaded(files):
    return load_model(files["model"])


@pytest.fixture(scope="module")
def reference_answers(files, loaded, tmp_path_factory) -> Path:
    """One uninterrupted, unsharded, one-question-at-a-time run."""
    out = tmp_path_factory.mktemp("reference") / "answers.jsonl"
    answer_questions(
        loaded,
        load_questions(files["questions"]),
        out,
        image_folder=files["images"],
        settings=SETTINGS,
        batch_size=1,
    )
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_load_model_reads_the_template_and_pads_left(files, loaded, tmp_path) -> None:
    assert loaded.template_name == "vicuna_v1"
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token is not None
    assert loaded.tokens_per_image == loaded.model.config.num_image_tokens == 36
    assert loaded.image_token_id == loaded.model.config.image_token_id
    assert loaded.model_id == "tiny-tokenpacker" and not loaded.model.training
    # The prompt is the training template's generation prompt, tokenized as in training.
    ids = loaded.prompt_ids([Turn("user", "<image>\nHi")])
    assert ids.count(loaded.image_token_id) == 36
    assert loaded.tokenizer.decode([t for t in ids if t != loaded.image_token_id]).endswith(
        "USER: \nHi ASSISTANT:"
    )

    assert load_model(files["model"], template="llama_2").template_name == "llama_2"
    bare = tmp_path / "converted"
    shutil.copytree(files["model"], bare)
    (bare / "training_config.json").unlink()
    with pytest.raises(
        ValueError, match="no training_config.json naming its conversation template; pass --template"
    ):
        load_model(bare)


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def test_chat_single_shot_prints_the_answer(files, loaded, capsys) -> None:
    image = files["images"] / "red.png"
    expected = generate(
        loaded,
        [loaded.prompt_ids([Turn("user", "<image>\nWhat colour is it?")])],
        [loaded.preprocessor()(str(image))],
        GenerationSettings(max_new_tokens=5),
    )[0]
    capsys.readouterr()
    code = cli(
        "chat",
        "--model",
        files["model"],
        "--image",
        image,
        "--prompt",
        "What colour is it?",
        "--max_new_tokens",
        5,
    )
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_chat_keeps_the_history_and_handles_commands(files, loaded, capsys, monkeypatch) -> None:
    image = str(files["images"] / "green_wide.png")
    session = ChatSession(loaded, image, GenerationSettings(max_new_tokens=5))
    first, second = session.ask("What is this?"), session.ask("And the colour?")
    # The second answer was conditioned on the first exchange: the image rides on the first turn.
    assert [turn.text for turn in session.history] == [
        "<image>\nWhat is this?",
        first,
        "And the colour?",
        second,
    ]
    alone = ChatSession(loaded, image, GenerationSettings(max_new_tokens=5)).ask("And the colour?")

    monkeypatch.setattr(
        sys,
        "stdin",
        io.StringIO("What is this?\n\nAnd the colour?\n/reset\nAnd the colour?\n/exit\nignored\n"),
    )
    capsys.readouterr()
    assert cli("chat", "--model", files["model"], "--image", image, "--max_new_tokens", 5) == 0
    out = capsys.readouterr().out
    assert out.count("USER: ") == 6 and out.count("ASSISTANT: ") == 3  # the blank line asks again
    assert "(new conversation)" in out
    replies = [part.split("\nUSER: ")[0].strip() for part in out.split("ASSISTANT: ")[1:]]
    assert replies == [first, second, alone]  # streamed, and the history was dropped by /reset

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\n"))  # end of input exits cleanly
    assert cli("chat", "--model", files["model"], "--image", image, "--max_new_tokens", 5) == 0
    assert capsys.readouterr().out.count("ASSISTANT: ") == 1


# --------------------------------------------------------------------------------------------
# Batch answering
# --------------------------------------------------------------------------------------------


def test_answer_file_format(files, loaded, reference_answers) -> None:
    answers = read_answers(reference_answers)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in QUESTIONS]
    assert answers[3]["prompt"] == "Which colour?\nA. red\nB. green\nC. blue"
    assert answers[4]["prompt"] == "Describe the picture."  # the <image> placeholder is not part of it
    assert answers[6]["prompt"] == "Look closely.\nIs there a square?"
    assert answers[1]["metadata"] == {
        "image": "green_wide.png",
        "template": "vicuna_v1",
        "max_new_tokens": 6,
        "temperature": 0.0,
        "top_p": None,
        "num_beams": 1,
        "category": "adversarial",
    }
    for answer in answers:
        assert answer["model_id"] == "tiny-tokenpacker" and isinstance(answer["text"], str)
        assert answer["answer_id"] == answer_id(answer["question_id"], "tiny-tokenpacker", answer["prompt"])
    assert answer_id(1, "m", "p") == hashlib.sha256(b'[1, "m", "p"]').hexdigest()[:32]


def test_batched_equals_unbatched_and_reruns_are_identical(
    files, loaded, reference_answers, tmp_path
) -> None:
    batched = tmp_path / "batched.jsonl"
    code = cli(
        "answer", "--model", files["model"], "--questions", files["questions"], "--answers_file", batched,
        "--image_folder", files["images"], "--batch_size", 3, "--max_new_tokens", 6,
    )  # fmt: skip
    assert code == 0
    assert batched.read_bytes() == reference_answers.read_bytes()
    # A complete file is left as it is by a rerun.
    run = answer_questions(
        loaded, load_questions(files["questions"]), batched, image_folder=files["images"], settings=SETTINGS
    )
    assert run.answered == 0 and run.previously_answered == len(QUESTIONS) and run.complete
    assert batched.read_bytes() == reference_answers.read_bytes()


def test_resume_after_an_interruption(files, loaded, reference_answers, tmp_path) -> None:
    questions = load_questions(files["questions"])
    out = tmp_path / "answers.jsonl"

    def run(**kwargs):
        return answer_questions(
            loaded, questions, out, image_folder=files["images"], settings=SETTINGS, batch_size=2, **kwargs
        )

    first = run(max_questions=3)
    assert first.answered == 3 and not first.complete
    assert len(out.read_text().splitlines()) == 3
    # A crash in the middle of writing the next batch leaves half a line behind.
    complete = reference_answers.read_text().splitlines(keepends=True)
    with out.open("a") as handle:
        handle.write(complete[3][:25])
    second = run()
    assert second.previously_answered == 3 and second.answered == 4 and second.complete
    assert out.read_bytes() == reference_answers.read_bytes()  # same file, no duplicate, no debris

    # Truncating a finished file mid-line (e.g. a copy cut short) is repaired the same way.
    out.write_bytes(reference_answers.read_bytes()[: len("".join(complete[:5])) + 40])
    assert run().answered == 2
    assert out.read_bytes() == reference_answers.read_bytes()


def test_a_last_answer_without_its_newline_is_kept(
    files, loaded, reference_answers, tmp_path, caplog
) -> None:
    """Files joined with "\\n" by other tools end without a newline: their last answer is whole, so it
    is read, and a resumed run adds the newline instead of cutting the answer off."""
    complete = reference_answers.read_text().splitlines()
    out = tmp_path / "answers.jsonl"
    out.write_text("\n".join(complete[:3]))
    expected = [json.loads(line)["question_id"] for line in complete[:3]]
    with caplog.at_level("WARNING"):
        assert [answer["question_id"] for answer in read_answers(out)] == expected
    assert "partial line" not in caplog.text
    assert out.read_text() == "\n".join(complete[:3])  # reading changes nothing
    run = answer_questions(
        loaded, load_questions(files["questions"]), out, image_folder=files["images"], settings=SETTINGS
    )
    assert run.previously_answered == 3 and run.answered == len(QUESTIONS) - 3 and run.complete
    assert out.read_bytes() == reference_answers.read_bytes()

    # A fragment that is not a whole answer object is still an interrupted write: dropped (with a warning).
    for fragment in (complete[3][:-1], '{"text": "no question_id"}', "[1, 2]"):
        out.write_text("\n".join(complete[:3]) + "\n" + fragment)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert [answer["question_id"] for answer in read_answers(out)] == expected
        assert "ends with a partial line" in caplog.text


def test_shards_merge_into_the_unsharded_file(files, reference_answers, tmp_path) -> None:
    answers = tmp_path / "answers.jsonl"
    common = ["--model", files["model"], "--questions", files["questions"], "--image_folder", files["images"]]
    for index in range(3):
        assert cli("answer", *common, "--answers_file", answers, "--num_shards", 3, "--shard_index", index,
                   "--batch_size", 2, "--max_new_tokens", 6) == 0  # fmt: skip
    shards = [shard_file(answers, index, 3) for index in range(3)]
    assert [path.name for path in shards] == [f"answers.shard-{i}-of-3.jsonl" for i in range(3)]
    assert [len(read_answers(path)) for path in shards] == [3, 2, 2]  # questions 0,3,6 / 1,4 / 2,5
    assert [a["question_id"] for a in read_answers(shards[1])] == ["two", 5]
    assert not answers.exists()
    assert (
        cli("merge-answers", "--questions", files["questions"], "--answers_file", answers, "--num_shards", 3)
        == 0
    )
    assert answers.read_bytes() == reference_answers.read_bytes()

    questions = load_questions(files["questions"])
    with pytest.raises(QuestionFileError, match=r"answer 5 of 7 questions; unanswered: 3, 6"):
        merge_answer_files(questions, shards[:2], tmp_path / "partial.jsonl")
    with pytest.raises(QuestionFileError, match="is also answered at"):
        merge_answer_files(questions, [shards[0], *shards], tmp_path / "twice.jsonl")
    with pytest.raises(SystemExit, match=r"answers\.shard-0-of-2\.jsonl does not exist"):
        cli("merge-answers", "--questions", files["questions"], "--answers_file", answers, "--num_shards", 2)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question_id": 1, "text": "a"}', '{"question_id": 2, "text": "b"', ""], r"q\.jsonl line 2: invalid JSON"),
        (['{"question_id": 1, "text": "a"}', '{"text": "b"}'], r"q\.jsonl line 2: missing 'question_id'"),
        (['{"question_id": 1}'], r"q\.jsonl line 1 \(question_id 1\): missing 'text' \(or 'question'\)"),
        (['{"question_id": 1, "text": "  "}'], "the question text is empty"),
        (['{"question_id": 1, "text": "a"}', "", '{"question_id": "1", "text": "b"}'],
         r"q\.jsonl line 3: duplicate question_id '1' \(first at q\.jsonl line 1\)"),
        (['{"question_id": 1, "text": "a", "choices": "red"}'], "'choices'/'options' must be a list of strings"),
        (['[1, 2]'], r"line 1: a question must be a JSON object, got list"),
    ],
)  # fmt: skip
def test_malformed_question_files_name_the_row(tmp_path, lines, message) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QuestionFileError, match=message):
        load_questions(path)


def test_json_question_files_and_llava_conversation_rows(tmp_path) -> None:
    path = tmp_path / "q.json"
    path.write_text(
        json.dumps(
            [
                {"question_id": 1, "question": "a?", "options": {"A": "x", "B": "y"}},
                {"id": "sqa-4", "image": "4.png", "conversations": [
                    {"from": "human", "value": "<image>\nContext: none\nWhich?"}, {"from": "gpt", "value": "A"}]},
                {"question_id": 1, "text": "again"},
            ]
        )
    )  # fmt: skip
    with pytest.raises(
        QuestionFileError, match=r"q\.json item 2: duplicate question_id 1 \(first at q\.json item 0\)"
    ):
        load_questions(path)
    path.write_text(json.dumps(json.loads(path.read_text())[:2]))
    first, second = load_questions(path)
    assert first.prompt() == "a?\nA. x\nB. y"
    assert (second.question_id, second.image, second.prompt("Say the letter.")) == (
        "sqa-4", "4.png", "Context: none\nWhich?\nSay the letter."
    )  # fmt: skip
    assert second.turns()[0].text == "<image>\nContext: none\nWhich?"


def test_repeated_question_ids_can_be_numbered(tmp_path) -> None:
    # LLaVA's llava_mme.jsonl: both questions of an image carry the image's path as question_id.
    path = tmp_path / "llava_mme.jsonl"
    rows = [
        {"question_id": "existence/1.png", "image": "existence/1.png", "text": "Is there a dog?"},
        {"question_id": "existence/1.png", "image": "existence/1.png", "text": "Is there a cat?"},
        {"question_id": "count/2.png", "image": "count/2.png", "text": "Two cups?"},
        {"question_id": "existence/1.png", "image": "existence/1.png", "text": "A third?"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(QuestionFileError, match="--number_duplicate_ids numbers repeats"):
        load_questions(path)
    questions = load_questions(path, number_duplicate_ids=True)
    assert [q.question_id for q in questions] == [
        "existence/1.png", "existence/1.png#2", "count/2.png", "existence/1.png#3"
    ]  # fmt: skip
    assert [q.text for q in questions] == [row["text"] for row in rows]


def test_missing_and_corrupt_images_name_the_row(files, loaded, tmp_path) -> None:
    rows = [
        {"question_id": 1, "image": "red.png", "text": "a"},
        {"question_id": "q2", "image": "nope.png", "text": "b"},
    ]
    questions = load_questions(write_questions(tmp_path / "q.jsonl", rows))
    out = tmp_path / "a.jsonl"
    with pytest.raises(
        BadSample, match=r"row 2, id 'q2': missing_image: image 'nope.png' .* \(q\.jsonl line 2\)"
    ):
        answer_questions(loaded, questions, out, image_folder=files["images"], settings=SETTINGS)
    assert not out.exists()  # checked before anything is generated

    rows[1]["image"] = "corrupt.png"
    questions = load_questions(write_questions(tmp_path / "q.jsonl", rows))
    with pytest.raises(BadSample, match=r"row 2, id 'q2': corrupt_image: .*cannot be decoded") as error:
        answer_questions(
            loaded, questions, out, image_folder=files["images"], settings=SETTINGS, batch_size=1
        )
    assert error.value.kind == "corrupt_image"
    assert len(read_answers(out)) == 1  # the batch before the bad image was kept

    rows[1]["image"] = "../outside.png"
    write_questions(tmp_path / "q.jsonl", rows)
    with pytest.raises(
        SystemExit, match=r"tokenpacker-llava answer: error: row 2, id 'q2': image_outside_folder"
    ):
        cli("answer", "--model", files["model"], "--questions", tmp_path / "q.jsonl", "--answers_file",
            tmp_path / "b.jsonl", "--image_folder", files["images"])  # fmt: skip


def test_an_answers_file_from_another_run_is_refused(files, loaded, reference_answers, tmp_path) -> None:
    questions = load_questions(files["questions"])
    out = tmp_path / "a.jsonl"
    shutil.copy(reference_answers, out)
    with pytest.raises(
        QuestionFileError, match=r"line 1: written with other settings \{'max_new_tokens': 6\}"
    ):
        answer_questions(loaded, questions, out, settings=GenerationSettings(max_new_tokens=7))
    with pytest.raises(
        QuestionFileError, match=r"line 1: question_id 1 was asked 'What colour is the square\?', this run"
    ):
        answer_questions(loaded, questions, out, settings=SETTINGS, prompt_suffix="Answer briefly.")
    lines = reference_answers.read_text().splitlines(keepends=True)
    out.write_text(lines[0].replace('"tiny-tokenpacker"', '"other-model"'))
    with pytest.raises(QuestionFileError, match="line 1: written by model 'other-model'"):
        answer_questions(loaded, questions, out, settings=SETTINGS)
    out.write_text(lines[0] + lines[0])
    with pytest.raises(QuestionFileError, match="line 2: question_id 1 is answered twice"):
        answer_questions(loaded, questions, out, settings=SETTINGS)
    shard_file(out, 0, 2).write_text(lines[1])  # question "two" belongs to shard 1 of 2
    with pytest.raises(QuestionFileError, match="not among this run's questions .*another shard"):
        answer_questions(loaded, questions, out, settings=SETTINGS, num_shards=2, shard_index=0)


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------


def test_eval_answers_scores_and_writes_results(files, tmp_path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    labels = tmp_path / "pope_labels.jsonl"
    labels.write_text(
        "".join(json.dumps({"question_id": q["question_id"], "label": "yes"}) + "\n" for q in QUESTIONS)
    )
    argv = ["eval", "--model", model, "--benchmark", "pope", "--questions", files["questions"],
            "--annotations", labels, "--image_folder", files["images"], "--max_new_tokens", 6, "--batch_size", 4]  # fmt: skip
    assert cli(*argv) == 0
    answers = model / "eval" / "pope" / "answers.jsonl"
    results = json.loads((model / "eval" / "pope" / "results.json").read_text())
    assert results["benchmark"] == "pope" and results["model_id"] == "model"
    assert results["metrics"] == score_answers("pope", answers, labels)
    assert json.loads(capsys.readouterr().out) == results["metrics"]
    assert results["num_answers"] == len(QUESTIONS)
    assert results["settings"]["template"] == "vicuna_v1" and results["settings"]["max_new_tokens"] == 6
    assert results["settings"]["prompt_suffix"] is None and results["settings"]["batch_size"] == 4
    assert results["timestamp"].endswith("+00:00")
    # A rerun answers nothing new and rescores.
    before = answers.read_bytes()
    assert cli(*argv) == 0
    assert answers.read_bytes() == before


def test_eval_rejects_an_unknown_benchmark_before_loading_anything(files, tmp_path) -> None:
    with pytest.raises(
        SystemExit, match=r"unknown benchmark 'vqa2'; available: gqa, mmbench, mme, pope, scienceqa_img"
    ):
        cli("eval", "--model", tmp_path / "no-model", "--benchmark", "vqa2", "--questions", files["questions"],
            "--annotations", files["questions"])  # fmt: skip


def test_score_command(tmp_path, reference_answers, capsys) -> None:
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(json.dumps({"question_id": q["question_id"], "label": "no"}) + "\n" for q in QUESTIONS)
    )
    assert cli("score", "--benchmark", "pope", "--answers", reference_answers, "--annotations", labels,
               "--output", tmp_path / "m.json") == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_questions"] == len(QUESTIONS)
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == metrics


# --------------------------------------------------------------------------------------------
# lmms-eval adapter
# --------------------------------------------------------------------------------------------


def request(*args):
    """An lmms-eval ``Instance`` as the model sees it: plain data behind ``.args``."""
    return SimpleNamespace(args=args)


def test_lmms_eval_generate_until(files, loaded) -> None:
    adapter = TokenPackerLlavaLmms(loaded=loaded, batch_size=2, max_new_tokens=6)
    docs = [{"image": files["images"] / name} for name in ("red.png", "green_wide.png", "blue_tall.png")]
    adapter.task_dict = {"toy": {"test": docs}}

    def doc_to_visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    greedy = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    requests = [
        request("What colour?", greedy, doc_to_visual, 0, "toy", "test"),
        request("<image>\nWhat shape?", greedy, doc_to_visual, 1, "toy", "test"),
        request("Say hello.", {"max_new_tokens": 4}, None, 2, "toy", "test"),
        request("What colour?", greedy, doc_to_visual, 2, "toy", "test"),
    ]
    outputs = adapter.generate_until(requests)

    def expected(text, image, max_new_tokens):
        images = [loaded.preprocessor()(str(image))] if image else []
        prompt = loaded.prompt_ids([Turn("user", "<image>\n" * len(images) + text.removeprefix("<image>\n"))])
        return generate(loaded, [prompt], [images], GenerationSettings(max_new_tokens=max_new_tokens))[0]

    assert outputs == [
        expected("What colour?", docs[0]["image"], 6),
        expected("What shape?", docs[1]["image"], 6),
        expected("Say hello.", None, 4),
        expected("What colour?", docs[2]["image"], 6),
    ]
    # `until` cuts the answer at the first stop string.
    stop = outputs[0][2:4]
    assert stop and adapter.generate_until([request("What colour?", {**greedy, "until": [stop]}, doc_to_visual, 0,
                                                     "toy", "test")]) == [outputs[0][: outputs[0].index(stop)]]  # fmt: skip


def test_lmms_eval_loglikelihood_scores_the_tokens_training_supervises(files, loaded) -> None:
    adapter = TokenPackerLlavaLmms(loaded=loaded)
    image = files["images"] / "red.png"
    adapter.task_dict = {"toy": {"val": [{"image": image, "answer": "a red square"}]}}
    requests = [
        request("What is it?", "a red square", lambda doc: [Image.open(doc["image"])], 0, "toy", "val"),
        request("What is it?", lambda doc: doc["answer"], None, 0, "toy", "val"),
    ]
    (with_image, greedy), (text_only, _) = adapter.loglikelihood(requests)
    assert isinstance(greedy, bool) and with_image < 0 and text_only < 0 and with_image != text_only

    # Reference: the training tokenization of the same exchange; its supervised tokens minus "</s>".
    template = get_template("vicuna_v1", loaded.tokenizer)
    sample = tokenize_conversation(
        [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "a red square")],
        template,
        loaded.tokenizer,
        image_token_id=loaded.image_token_id,
        tokens_per_image=loaded.tokens_per_image,
        max_length=None,
    )
    positions = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX][:-1]
    assert sample.input_ids[positions[-1] + 1] == loaded.tokenizer.eos_token_id
    with torch.no_grad():
        logits = loaded.model(
            input_ids=torch.tensor([sample.input_ids]), pixel_values=loaded.preprocessor()(str(image))[None]
        ).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    reference = sum(float(logprobs[i - 1, sample.input_ids[i]]) for i in positions)
    assert with_image == pytest.approx(reference, abs=1e-4)
