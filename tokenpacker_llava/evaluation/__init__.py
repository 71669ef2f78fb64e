"""Benchmark evaluation: scorers for answer files, the ``eval`` pipeline and an lmms-eval adapter.

* ``benchmarks``: scorers registered by exact name in ``BENCHMARKS`` (``vqav2``, ``gqa``,
  ``textvqa``, ``pope``, ``mme``, ``mmbench``, ``scienceqa_img``); its docstring documents the
  annotation format each one reads.
* ``normalize``: the official answer normalizations and free-text answer parsers.
* ``run.evaluate_model``: answer a benchmark's questions with a model folder and score them
  (``tokenpacker-llava eval``).
* ``lmms_eval_adapter``: the model as an lmms-eval ``lmms`` (lmms-eval itself is optional).
"""

from tokenpacker_llava.evaluation.benchmarks import (
    BENCHMARKS,
    AnnotationError,
    Benchmark,
    get_benchmark,
    score_answers,
)

__all__ = ["BENCHMARKS", "AnnotationError", "Benchmark", "get_benchmark", "score_answers"]
