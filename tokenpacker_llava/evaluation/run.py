"""``tokenpacker-llava eval``: answer a benchmark's questions with a model folder, then score them.

Answers go to ``MODEL/eval/BENCHMARK/answers.jsonl`` (resumable: a rerun answers only what is
missing, then rescores) and the metrics, with the model id, the settings and a timestamp, to
``MODEL/eval/BENCHMARK/results.json``.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tokenpacker_llava.evaluation.benchmarks import get_benchmark

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"


def eval_dir(model_path: str | Path, benchmark: str) -> Path:
    return Path(model_path) / "eval" / benchmark


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def evaluate_model(
    model_path: str | Path,
    benchmark: str,
    questions: str | Path,
    annotations: str | Path,
    *,
    image_folder: str | Path | None = None,
    output_dir: str | Path | None = None,
    settings: Any = None,
    batch_size: int = 8,
    prompt_suffix: str | None = None,
    template: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_id: str | None = None,
    loaded: Any = None,
    number_duplicate_ids: bool = False,
) -> dict[str, Any]:
    """Answer ``questions`` and score them with ``benchmark``; returns what ``results.json`` holds.

    ``prompt_suffix`` None uses the benchmark's default (the option-letter instruction for MMBench
    and ScienceQA, nothing otherwise); "" adds nothing. ``loaded`` reuses an already loaded model.
    ``number_duplicate_ids``: see ``load_questions``.
    """
    from tokenpacker_llava import __version__
    from tokenpacker_llava.inference.answer import answer_questions, load_questions
    from tokenpacker_llava.inference.generation import GenerationSettings

    scorer = get_benchmark(benchmark)  # an unknown name fails before anything is loaded
    for kind, path in (("question", questions), ("annotation", annotations)):
        if not Path(path).exists():
            raise FileNotFoundError(f"{kind} file {path} does not exist")
    question_list = load_questions(questions, number_duplicate_ids=number_duplicate_ids)
    settings = settings or GenerationSettings()
    suffix = scorer.default_prompt_suffix if prompt_suffix is None else (prompt_suffix or None)
    if loaded is None:
        from tokenpacker_llava.inference.loading import load_model

        loaded = load_model(model_path, template=template, device=device, dtype=dtype, model_id=model_id)
    out = Path(output_dir) if output_dir is not None else eval_dir(model_path, benchmark)
    answers_file = out / ANSWERS_FILE
    run = answer_questions(
        loaded,
        question_list,
        answers_file,
        image_folder=image_folder,
        settings=settings,
        batch_size=batch_size,
        prompt_suffix=suffix,
    )
    logger.info(
        "%s: %d answered now, %d from a previous run", answers_file, run.answered, run.previously_answered
    )
    metrics = scorer.score(answers_file, annotations)
    results = {
        "benchmark": benchmark,
        "model_id": loaded.model_id,
        "model_path": str(Path(model_path).resolve()),
        "metrics": metrics,
        "settings": {
            "template": loaded.template_name,
            **settings.as_dict(),
            "batch_size": batch_size,
            "prompt_suffix": suffix,
            "questions": str(Path(questions).resolve()),
            "annotations": str(Path(annotations).resolve()),
            "image_folder": str(Path(image_folder).resolve()) if image_folder is not None else None,
            "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
            "device": str(loaded.device),
        },
        "num_answers": run.previously_answered + run.answered,
        "answers_file": str(answers_file.resolve()),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tokenpacker_llava": __version__},
    }
    write_json(out / RESULTS_FILE, results)
    return results
