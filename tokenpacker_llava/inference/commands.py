"""The ``chat``, ``answer``, ``merge-answers``, ``eval`` and ``score`` subcommands.

Each ``add_*`` function registers one subcommand on ``tokenpacker-llava``'s subparsers (see
``tokenpacker_llava.cli.SUBCOMMANDS``); implementations are imported when the command runs.
User errors (a malformed question file, a missing image, an unknown benchmark, ...) end the
command with a one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="model folder (a stage-2 output or converted checkpoint)"
    )
    parser.add_argument(
        "--template", help="conversation template (default: the one in the folder's training_config.json)"
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on GPUs, float32 on CPU")


def _add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, deterministic")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)


def _settings(args: argparse.Namespace):
    from tokenpacker_llava.inference.generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
    )


def _load(args: argparse.Namespace, model_id: str | None = None):
    from tokenpacker_llava.inference.loading import load_model

    return load_model(
        args.model, template=args.template, device=args.device, dtype=args.dtype, model_id=model_id
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    from tokenpacker_llava.data.records import BadSample
    from tokenpacker_llava.evaluation.benchmarks import AnnotationError
    from tokenpacker_llava.inference.answer import QuestionFileError
    from tokenpacker_llava.registry import RegistryError

    return (BadSample, AnnotationError, QuestionFileError, RegistryError, FileNotFoundError)


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with user errors turned into ``SystemExit("tokenpacker-llava COMMAND: message")``."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except _user_errors() as error:
            command = getattr(args, "command", None) or run.__name__.removeprefix("_run_").replace("_", "-")
            raise SystemExit(f"tokenpacker-llava {command}: error: {error}") from error

    wrapper.__name__ = run.__name__
    return wrapper


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------


def add_chat(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model about an image (one --prompt, or an interactive conversation)",
        description="With --prompt: print the answer and exit. Without: read questions from stdin, stream the "
        "answers and keep the conversation; /reset starts over, /exit or end of input quits.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--image", help="image file (attached to the first question); omit for text only")
    parser.add_argument("--prompt", help="ask this one question, print the answer and exit")
    _add_generation_arguments(parser, max_new_tokens=512)
    parser.set_defaults(func=_guarded(_run_chat))


def _run_chat(args: argparse.Namespace) -> int:
    from tokenpacker_llava.inference.chat import run_chat

    settings = _settings(args)
    return run_chat(_load(args), image=args.image, prompt=args.prompt, settings=settings)


# --------------------------------------------------------------------------------------------
# answer / merge-answers
# --------------------------------------------------------------------------------------------


def _add_duplicate_ids_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--number_duplicate_ids",
        action="store_true",
        help="number repeated question_ids as id#2, id#3, ... instead of failing (LLaVA's llava_mme.jsonl "
        "gives both questions of an image the same id); use the same flag for answer, merge-answers, eval",
    )


def add_answer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "answer",
        help="answer a LLaVA question file (.jsonl/.json) into a LLaVA answer .jsonl (resumable, shardable)",
        description="Batched greedy answering. A rerun skips the questions already in --answers_file and "
        "appends the rest. With --num_shards N --shard_index i only questions i, i+N, i+2N, ... are answered, "
        "into ANSWERS.shard-i-of-N.jsonl; `merge-answers` joins the shards.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--questions", required=True, help="question file (.jsonl or .json)")
    parser.add_argument(
        "--answers_file", required=True, help="answer .jsonl (the shard files are named after it)"
    )
    parser.add_argument("--image_folder", help="folder the questions' image paths are relative to")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--prompt_suffix",
        help="appended on its own line to every question (e.g. an answer-format instruction)",
    )
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--shard_index", type=int, default=0)
    parser.add_argument(
        "--max_questions", type=int, help="answer at most this many new questions in this run"
    )
    parser.add_argument("--model_id", help="model_id written into the answers (default: the folder name)")
    _add_duplicate_ids_argument(parser)
    _add_generation_arguments(parser, max_new_tokens=128)
    parser.set_defaults(func=_guarded(_run_answer))


def _run_answer(args: argparse.Namespace) -> int:
    from tokenpacker_llava.inference.answer import answer_questions, load_questions, select_shard

    questions = load_questions(args.questions, number_duplicate_ids=args.number_duplicate_ids)
    select_shard(questions, args.num_shards, args.shard_index)  # validates the shard before loading
    settings = _settings(args)
    run = answer_questions(
        _load(args, model_id=args.model_id),
        questions,
        args.answers_file,
        image_folder=args.image_folder,
        settings=settings,
        batch_size=args.batch_size,
        prompt_suffix=args.prompt_suffix,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        max_questions=args.max_questions,
    )
    done = run.previously_answered + run.answered
    print(f"{run.answers_file}: {done} of {run.total} questions answered ({run.answered} in this run)")
    return 0


def add_merge_answers(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge-answers",
        help="join the shard answer files of `answer --num_shards N` into one file, in question-file order",
    )
    parser.add_argument("--questions", required=True, help="the question file the shards answered")
    parser.add_argument(
        "--answers_file", required=True, help="the merged output (the --answers_file of the shards)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--num_shards", type=int, help="merge ANSWERS.shard-i-of-N.jsonl for i < N")
    source.add_argument("--inputs", nargs="+", help="explicit shard files")
    _add_duplicate_ids_argument(parser)
    parser.set_defaults(func=_guarded(_run_merge_answers))


def _run_merge_answers(args: argparse.Namespace) -> int:
    from tokenpacker_llava.inference.answer import load_questions, merge_answer_files, shard_file

    questions = load_questions(args.questions, number_duplicate_ids=args.number_duplicate_ids)
    inputs = args.inputs or [
        shard_file(args.answers_file, i, args.num_shards) for i in range(args.num_shards)
    ]
    output = merge_answer_files(questions, inputs, args.answers_file)
    print(f"merged {len(inputs)} shard file(s) -> {output} ({len(questions)} answers)")
    return 0


# --------------------------------------------------------------------------------------------
# eval / score
# --------------------------------------------------------------------------------------------


def _benchmark_names() -> str:
    from tokenpacker_llava.evaluation.benchmarks import BENCHMARKS

    return ", ".join(BENCHMARKS.names())


def add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="answer a benchmark's questions and score them (results in MODEL/eval/BENCHMARK/)",
        description="Answers into MODEL/eval/BENCHMARK/answers.jsonl (resumable) and writes the metrics, model "
        "id, settings and a timestamp to MODEL/eval/BENCHMARK/results.json. The annotation formats are "
        "documented in tokenpacker_llava/evaluation/benchmarks.py.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--benchmark", required=True, help=f"one of: {_benchmark_names()}")
    parser.add_argument("--questions", required=True, help="question file (.jsonl or .json)")
    parser.add_argument(
        "--annotations", required=True, help="the benchmark's annotation file (or MME folder)"
    )
    parser.add_argument("--image_folder", help="folder the questions' image paths are relative to")
    parser.add_argument("--output_dir", help="default: MODEL/eval/BENCHMARK")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--prompt_suffix",
        help="appended to every question (default: the benchmark's, e.g. the option-letter instruction for "
        "mmbench/scienceqa_img; pass '' for none)",
    )
    parser.add_argument("--model_id", help="model_id written into the answers (default: the folder name)")
    _add_duplicate_ids_argument(parser)
    _add_generation_arguments(parser, max_new_tokens=128)
    parser.set_defaults(func=_guarded(_run_eval))


def _print_metrics(metrics: dict[str, Any]) -> None:
    print(json.dumps(metrics, indent=2, ensure_ascii=False))


def _run_eval(args: argparse.Namespace) -> int:
    from tokenpacker_llava.evaluation.run import RESULTS_FILE, eval_dir, evaluate_model

    results = evaluate_model(
        args.model,
        args.benchmark,
        args.questions,
        args.annotations,
        image_folder=args.image_folder,
        output_dir=args.output_dir,
        settings=_settings(args),
        batch_size=args.batch_size,
        prompt_suffix=args.prompt_suffix,
        template=args.template,
        device=args.device,
        dtype=args.dtype,
        model_id=args.model_id,
        number_duplicate_ids=args.number_duplicate_ids,
    )
    _print_metrics(results["metrics"])
    out = args.output_dir or eval_dir(args.model, args.benchmark)
    print(f"results written to {out}/{RESULTS_FILE}", file=sys.stderr)
    return 0


def add_score(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", help="score an existing answer file against a benchmark's annotations"
    )
    parser.add_argument("--benchmark", required=True, help=f"one of: {_benchmark_names()}")
    parser.add_argument("--answers", required=True, help="answer .jsonl")
    parser.add_argument(
        "--annotations", required=True, help="the benchmark's annotation file (or MME folder)"
    )
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.set_defaults(func=_guarded(_run_score))


def _run_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenpacker_llava.evaluation.benchmarks import score_answers
    from tokenpacker_llava.evaluation.run import write_json

    metrics = score_answers(args.benchmark, args.answers, args.annotations)
    _print_metrics(metrics)
    if args.output:
        write_json(
            Path(args.output), {"benchmark": args.benchmark, "answers": args.answers, "metrics": metrics}
        )
    return 0


SUBCOMMANDS = (add_chat, add_answer, add_merge_answers, add_eval, add_score)
