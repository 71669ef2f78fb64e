"""Where records come from: LLaVA JSON / JSONL files and Hub datasets, mixed with weights.

Local files are read into a memory-mapped ``datasets`` table holding each record as its JSON
text (one row per record, parsed lazily in ``__getitem__``). Keeping the text rather than
letting Arrow infer a schema means a malformed row (a number where a string belongs, a
missing field) is reported as that row's problem instead of failing the whole file, and
nothing is coerced silently. Hub dataset ids load through ``datasets.load_dataset``.
``streaming=True`` gives an ``IterableDataset`` for data that does not fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

RAW_FEATURES = datasets.Features({"row": datasets.Value("int64"), "json": datasets.Value("string")})


@dataclass(frozen=True)
class DataSource:
    """One input: a file (``.json`` array or ``.jsonl``) or a Hub dataset id, with a mixing weight.

    ``weight`` scales how often its rows are seen per epoch: 1 = each row once, 0.5 = a
    deterministic half, 2 = each row twice.
    """

    path: str
    weight: float = 1.0
    image_folder: str | None = None
    split: str = "train"

    @property
    def is_record_file(self) -> bool:
        """A local LLaVA .json/.jsonl file (anything else is a Hub id or a dataset folder)."""
        path = Path(self.path)
        return path.suffix in (".json", ".jsonl") and path.is_file()


def parse_data_path(spec: str | Sequence[str], image_folder: str | None = None) -> list[DataSource]:
    """Parse ``a.json,b.jsonl:0.5,org/name:2`` (or a list of such items) into sources.

    A trailing ``:<number>`` is the weight; every source shares ``image_folder``.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    sources = []
    for item in (part.strip() for entry in items for part in entry.split(",")):
        if not item:
            continue
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"data source {item!r}: the weight must be a positive number")
        sources.append(DataSource(path=path, weight=weight, image_folder=image_folder))
    if not sources:
        raise ValueError("no data source given")
    return sources


def iter_raw_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield ``{"row", "json"}`` for every record of a .json array or .jsonl file.

    A JSONL line that is not valid JSON is still yielded (its text as is), so that it is
    reported as a malformed row later instead of aborting the load.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            row = 0
            for line in handle:
                if line.strip():
                    yield {"row": row, "json": line.rstrip("\n")}
                    row += 1
        return
    with path.open(encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); use .jsonl for one record per line"
            ) from error
    if not isinstance(records, list):
        raise ValueError(f"{path} must hold a JSON array of records, got {type(records).__name__}")
    for row, record in enumerate(records):
        # ASCII escapes: a lone surrogate in one record must not stop Arrow from storing the file
        # (parse_record rejects that row by name).
        yield {"row": row, "json": json.dumps(record)}


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v1"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def load_source(
    source: DataSource, *, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one source as raw rows (``row`` + ``json`` for files; the Hub's own columns otherwise)."""
    if source.is_record_file:
        path = Path(source.path)
        if streaming:
            return datasets.IterableDataset.from_generator(
                iter_raw_records, features=RAW_FEATURES, gen_kwargs={"path": str(path)}
            )
        return datasets.Dataset.from_generator(
            iter_raw_records,
            features=RAW_FEATURES,
            gen_kwargs={"path": str(path)},
            fingerprint=_file_fingerprint(path),
        )
    if Path(source.path).suffix in (".json", ".jsonl"):
        raise FileNotFoundError(f"data file {source.path} does not exist")
    logger.info("loading dataset %s (split %s) with datasets.load_dataset", source.path, source.split)
    table = datasets.load_dataset(source.path, split=source.split, streaming=streaming)
    if streaming:
        # One schema for every stream, so sources of any origin interleave.
        return table.map(
            lambda record: {"row": -1, "json": json.dumps(record, default=str)},
            remove_columns=table.column_names,
        )
    return table


def raw_record(row: dict[str, Any]) -> tuple[int | None, Any]:
    """(row number, the record as Python objects) of one loaded row; invalid JSON gives the text."""
    if set(row) == {"row", "json"}:
        number = row["row"] if row["row"] >= 0 else None
        try:
            return number, json.loads(row["json"])
        except json.JSONDecodeError:
            return number, row["json"]
    return None, row


class MixedRecords:
    """Map-style view over several sources: ``mixed[i] -> (source, row, raw record)``.

    Weights become a deterministic index plan (whole repetitions plus an evenly spaced
    fraction), so an epoch's composition is fixed and reproducible across ranks.
    """

    def __init__(self, sources: Sequence[DataSource]) -> None:
        self.sources = list(sources)
        self.tables = [load_source(source) for source in self.sources]
        self.plan: list[tuple[int, int]] = []
        for index, (source, table) in enumerate(zip(self.sources, self.tables, strict=True)):
            count = round(source.weight * len(table))
            self.plan.extend((index, i) for i in _spread(count, len(table)))
            logger.info(
                "data source %s: %d rows, weight %g -> %d samples",
                source.path,
                len(table),
                source.weight,
                count,
            )

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> tuple[DataSource, int, Any]:
        source_index, table_row = self.plan[index]
        row, record = raw_record(self.tables[source_index][table_row])
        return self.sources[source_index], table_row if row is None else row, record


def _spread(count: int, size: int) -> list[int]:
    """``count`` row indices of a ``size``-row table: full passes, then an evenly spaced remainder."""
    if size == 0:
        return []
    full, rest = divmod(count, size)
    return list(range(size)) * full + [(k * size) // rest for k in range(rest)]


def interleave_streaming(sources: Sequence[DataSource], seed: int = 0) -> datasets.IterableDataset:
    """Stream several sources, drawing from each with probability proportional to its weight.

    Unlike ``MixedRecords`` (weight = how many times each row is used), a stream's size is not
    known up front, so weights here are sampling probabilities: the stream ends once every source
    has been read through, and sources that run out earlier start over (a small source with an
    equal weight repeats until the largest one ends).
    """
    streams = [load_source(source, streaming=True) for source in sources]
    if len(streams) == 1:
        return streams[0]
    total = sum(source.weight for source in sources)
    logger.info(
        "streaming %d sources, drawn with probabilities %s until each has been read once (smaller "
        "sources repeat)",
        len(sources),
        ", ".join(f"{source.path}: {source.weight / total:.3g}" for source in sources),
    )
    return datasets.interleave_datasets(
        streams,
        probabilities=[s.weight / total for s in sources],
        seed=seed,
        stopping_strategy="all_exhausted",
    )
