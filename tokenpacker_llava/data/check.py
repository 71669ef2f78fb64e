"""``data check``: validate every row of a dataset in parallel and summarize what is wrong.

Each row is parsed, its images are fully decoded, and (with a tokenizer) its conversation
is tokenized with the expanded visual tokens, so the report shows exactly what training
would hit: counts by problem kind with the first rows of each, and token-length statistics.
In slice mode (``patch_num``) each image counts the tokens of its own tile grid, planned from
its size as training plans it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from tokenpacker_llava.data.images import ImagePreprocessor, reference_image_processor
from tokenpacker_llava.data.records import BadSample, Record, parse_record
from tokenpacker_llava.data.slicing import layout_length, plan_slices
from tokenpacker_llava.data.sources import DataSource, MixedRecords
from tokenpacker_llava.data.templates import ConversationTemplate
from tokenpacker_llava.data.tokenize import tokenize_conversation

logger = logging.getLogger(__name__)


@dataclass
class CheckReport:
    rows: int = 0
    images: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)  # tokens incl. visual tokens, before truncation
    shortened: int = 0  # rows over max_length that truncation fixes (turns dropped)
    max_examples: int = 5

    @property
    def invalid(self) -> int:
        return sum(self.problems.values())

    def add_problem(self, error: BadSample) -> None:
        self.problems[error.kind] += 1
        shown = self.examples.setdefault(error.kind, [])
        if len(shown) < self.max_examples:
            shown.append(error.describe())

    def merge(self, other: CheckReport) -> None:
        self.rows += other.rows
        self.images += other.images
        self.shortened += other.shortened
        self.lengths.extend(other.lengths)
        for kind, count in other.problems.items():
            self.problems[kind] += count
            shown = self.examples.setdefault(kind, [])
            shown.extend(other.examples.get(kind, [])[: self.max_examples - len(shown)])

    def format(
        self, max_length: int | None, tokens_per_image: int, exact_lengths: bool, patch_num: int | None = None
    ) -> str:
        lines = [f"rows: {self.rows}  images decoded: {self.images}  invalid rows: {self.invalid}"]
        if self.problems:
            lines.append("problems by kind:")
            for kind, count in self.problems.most_common():
                lines.append(f"  {kind:22s} {count}")
                lines.extend(f"      {example}" for example in self.examples.get(kind, []))
        if self.lengths:
            what = "tokens" if exact_lengths else "words (no --tokenizer given; estimate)"
            stats = length_stats(self.lengths)
            per_image = (
                f"{tokens_per_image} visual tokens per view (slice mode, up to {patch_num} tiles + a global view)"
                if patch_num
                else f"{tokens_per_image} visual tokens per image"
            )
            lines.append(f"length in {what}, with {per_image}:")
            lines.append("  " + "  ".join(f"{name} {value:g}" for name, value in stats.items()))
            if max_length is not None and exact_lengths:
                # Rows that cannot fit at all are invalid (too_long, listed above) and have no length here.
                lines.append(
                    f"  over model_max_length {max_length}: {self.shortened} rows that training shortens "
                    f"(trailing turns dropped or the last answer cut), {self.problems['too_long']} too long to fit"
                )
        return "\n".join(lines)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    ordered = sorted(lengths)

    def quantile(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)])

    return {
        "min": float(ordered[0]),
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": quantile(0.5),
        "p95": quantile(0.95),
        "p99": quantile(0.99),
        "max": float(ordered[-1]),
    }


@dataclass
class RowChecker:
    """Everything needed to check rows; picklable so worker processes get their own copy."""

    records: MixedRecords
    tokenizer: PreTrainedTokenizerBase | None
    template: ConversationTemplate | None
    image_token_id: int | None
    tokens_per_image: int
    max_length: int | None
    image_processor: Any
    max_examples: int = 5
    patch_num: int | None = None  # slice mode: the most tiles per image; None: one view per image

    def check_range(self, start: int, stop: int) -> CheckReport:
        report = CheckReport(max_examples=self.max_examples)
        preprocessors: dict[str | None, ImagePreprocessor] = {}
        for index in range(start, stop):
            source, row, raw = self.records[index]
            report.rows += 1
            try:
                record = parse_record(raw, row=row, source=source.path)
                if source.image_folder not in preprocessors:
                    preprocessors[source.image_folder] = ImagePreprocessor(
                        self.image_processor, image_folder=source.image_folder
                    )
                preprocessor = preprocessors[source.image_folder]
                image_tokens = []
                for path in record.images:
                    try:
                        width, height = preprocessor.open(path).size
                    except BadSample as error:
                        raise error.at(record.row, record.id) from None
                    report.images += 1
                    image_tokens.append(self.image_tokens(height, width, preprocessor.size))
                length, shortened = self.length(record, image_tokens)
                report.lengths.append(length)
                report.shortened += shortened
            except BadSample as error:
                report.add_problem(error)
        return report

    def image_tokens(self, height: int, width: int, tile_hw: tuple[int, int]) -> int:
        """The tokens one image of this size expands to (separators of a slice layout included)."""
        if self.patch_num is None:
            return self.tokens_per_image
        plan = plan_slices(height, width, self.patch_num, tile_hw)
        return layout_length(plan.num_tiles, self.tokens_per_image)

    def length(self, record: Record, image_tokens: Sequence[int]) -> tuple[int, bool]:
        """(length with visual tokens before truncation, whether truncation is needed and works)."""
        if self.tokenizer is None or self.template is None:
            words = sum(len(turn.text.split()) for turn in record.turns)
            return words + sum(image_tokens), False
        # Placeholders stand in for a slice layout's separators: only the count matters here.
        expansions = [[self.image_token_id] * count for count in image_tokens]
        tokenize = dict(image_token_id=self.image_token_id, image_expansions=expansions)
        try:
            full = tokenize_conversation(
                record.turns, self.template, self.tokenizer, max_length=None, **tokenize
            )
            shortened = False
            if self.max_length is not None and len(full.input_ids) > self.max_length:
                # As training fits it (too_long when it cannot); cutting only untrained text after
                # the last answer does not count as shortening.
                fitted = tokenize_conversation(
                    record.turns, self.template, self.tokenizer, max_length=self.max_length, **tokenize
                )
                shortened = bool(fitted.dropped_turns or fitted.truncated_answer)
        except BadSample as error:
            raise error.at(record.row, record.id) from None
        return len(full.input_ids), shortened


def _check_chunk(checker: RowChecker, start: int, stop: int) -> CheckReport:
    return checker.check_range(start, stop)


def check_dataset(
    sources: Sequence[DataSource],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: ConversationTemplate | None = None,
    image_token_id: int | None = None,
    tokens_per_image: int = 144,
    max_length: int | None = 2048,
    image_processor: Any = None,
    num_workers: int | None = None,
    max_examples: int = 5,
    patch_num: int | None = None,
) -> CheckReport:
    """Check every row of ``sources`` (each once, whatever its weight).

    ``patch_num`` checks for slice mode (TokenPacker-HD): every image is planned into tiles
    and counts ``tokens_per_image`` (+1 separator) per view.
    """
    once = [DataSource(s.path, 1.0, s.image_folder, s.split) for s in sources]
    checker = RowChecker(
        records=MixedRecords(once),
        tokenizer=tokenizer,
        template=template,
        image_token_id=image_token_id,
        tokens_per_image=tokens_per_image,
        max_length=max_length,
        image_processor=image_processor if image_processor is not None else reference_image_processor(),
        max_examples=max_examples,
        patch_num=patch_num,
    )
    total = len(checker.records)
    workers = max(1, min(num_workers or os.cpu_count() or 1, total // 64 or 1))
    chunk = max(1, math.ceil(total / (workers * 8)))
    ranges = [(start, min(total, start + chunk)) for start in range(0, total, chunk)]
    report = CheckReport(max_examples=max_examples)
    progress = tqdm(total=total, desc="checking rows", unit="row", disable=total < 1000)
    if workers == 1:
        for start, stop in ranges:
            report.merge(_check_chunk(checker, start, stop))
            progress.update(stop - start)
    else:
        # Forked workers share the memory-mapped tables; each gets its own checker copy.
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(_check_chunk, checker, start, stop) for start, stop in ranges]
            for (start, stop), future in zip(ranges, futures, strict=True):
                report.merge(future.result())
                progress.update(stop - start)
    progress.close()
    return report
