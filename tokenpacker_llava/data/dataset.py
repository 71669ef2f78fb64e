"""The training dataset: raw LLaVA rows -> validated, tokenized samples with their images.

``SampleBuilder`` turns one ``Record`` into the sample dict the collators consume
(``input_ids``, ``labels``, ``pixel_values`` or None, ``row``, ``id``); ``pixel_values`` holds
every view of the sample's images in placeholder order (one per image, or in slice mode each
image's tiles and global view, ``data.visual_inputs``). ``LlavaDataset``
applies the bad-sample policy: with ``error`` the first bad row stops the run with its row
and reason; with ``skip`` the row is logged by name and replaced by the next good row, and
the skipped descriptions travel with the sample (``skipped``) so the trainer can count
them across data-loader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from tokenpacker_llava.data.records import IMAGE_PLACEHOLDER, BadSample, Record, parse_record
from tokenpacker_llava.data.sources import DataSource, MixedRecords
from tokenpacker_llava.data.templates import ConversationTemplate
from tokenpacker_llava.data.tokenize import tokenize_conversation
from tokenpacker_llava.data.visual_inputs import ImageLoader, ImageMode

logger = logging.getLogger(__name__)

BadSamplePolicy = Literal["error", "skip"]
BAD_SAMPLE_POLICIES = ("error", "skip")


def apply_policy(policy: BadSamplePolicy, skipped: list[str], load, *args: Any) -> dict[str, Any] | None:
    """``load(*args)``; on a bad row raise (``error``) or log it, note it in ``skipped``, return None."""
    try:
        return load(*args)
    except BadSample as error:
        if policy == "error":
            raise
        logger.warning("skipping bad sample: %s", error.describe())
        skipped.append(error.describe())
        return None


class SampleBuilder:
    """Builds one training sample from a validated record."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ConversationTemplate,
        *,
        image_token_id: int,
        tokens_per_image: int,
        max_length: int | None,
        image_processor: Any | None = None,
        image_aspect_ratio: str = "pad",
        patch_num: int = 9,
        separator_ids: tuple[int, int] | None = None,
    ) -> None:
        """``tokens_per_image``: tokens per view (per image outside slice mode); ``patch_num`` and
        ``separator_ids`` (the ``,`` and newline token ids) are used in slice mode only."""
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.mode = ImageMode(
            aspect_ratio=image_aspect_ratio,
            image_token_id=image_token_id,
            tokens_per_view=tokens_per_image,
            patch_num=patch_num,
            separator_ids=separator_ids,
        )
        self._loaders: dict[str | None, ImageLoader] = {}

    @property
    def max_tokens_per_image(self) -> int:
        """The longest expansion of one ``<image>`` (slice mode: the largest grid's)."""
        return self.mode.max_tokens_per_image

    def images_for(self, image_folder: str | None) -> ImageLoader:
        if self.image_processor is None:
            raise ValueError("this dataset has image rows but no image processor was given")
        if image_folder not in self._loaders:
            self._loaders[image_folder] = ImageLoader(
                self.image_processor, self.mode, image_folder=image_folder
            )
        return self._loaders[image_folder]

    def build(self, record: Record, image_folder: str | None = None) -> dict[str, Any]:
        """Tokenize first (cheap, catches most bad rows), then decode the images.

        In slice mode each image's layout depends on its size, read from the file header before
        tokenizing; the images are decoded afterwards with those same plans.
        """
        plans = None
        expansion: dict[str, Any] = {"tokens_per_image": self.tokens_per_image}
        try:
            if self.mode.slicing and record.images:
                loader = self.images_for(image_folder)
                plans = [loader.plan_path(path) for path in record.images]
                expansion = {"image_expansions": [loader.token_ids(plan) for plan in plans]}
            tokens = tokenize_conversation(
                record.turns,
                self.template,
                self.tokenizer,
                image_token_id=self.image_token_id,
                max_length=self.max_length,
                **expansion,
            )
        except BadSample as error:
            raise error.at(record.row, record.id) from None
        shortened = None
        if tokens.dropped_turns or tokens.truncated_answer:
            shortened = (
                f"row {record.row}, id {record.id!r}: shortened to fit {self.max_length} tokens, dropped "
                f"{tokens.dropped_turns} turn pair(s)"
                + (", truncated the last answer" if tokens.truncated_answer else "")
            )
            logger.info("%s", shortened)
        pixel_values = None
        if record.images and tokens.num_images:
            loader = self.images_for(image_folder)
            kept = record.images[: tokens.num_images]
            try:
                views = [
                    loader.load(path, plans[index] if plans else None).pixel_values
                    for index, path in enumerate(kept)
                ]
            except BadSample as error:
                raise error.at(record.row, record.id) from None
            pixel_values = torch.cat(views)
        return {
            "input_ids": torch.tensor(tokens.input_ids, dtype=torch.long),
            "labels": torch.tensor(tokens.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "row": record.row,
            "id": record.id,
            # Counted and reported by the trainer on every rank (this log line shows on rank 0 only).
            **({"shortened": shortened} if shortened else {}),
        }


class LlavaDataset(Dataset):
    """Map-style dataset over mixed sources with an explicit bad-sample policy."""

    def __init__(
        self,
        records: MixedRecords,
        builder: SampleBuilder,
        *,
        on_bad_sample: BadSamplePolicy = "error",
        max_consecutive_skips: int = 100,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        self.records = records
        self.builder = builder
        self.on_bad_sample = on_bad_sample
        self.max_consecutive_skips = max_consecutive_skips
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> tuple[DataSource, Record]:
        source, row, raw = self.records[index]
        return source, parse_record(raw, row=row, source=source.path)

    def load(self, index: int) -> dict[str, Any]:
        source, record = self.record(index)
        return self.builder.build(record, source.image_folder)

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[str] = []
        for attempt in range(self.max_consecutive_skips + 1):
            sample = apply_policy(self.on_bad_sample, skipped, self.load, (index + attempt) % len(self))
            if sample is None:
                continue
            if skipped:
                sample["skipped"] = skipped
            return sample
        raise RuntimeError(
            f"{len(skipped)} consecutive bad rows from index {index}; the data looks broken, "
            f"run `tokenpacker-llava data check` (last: {skipped[-1]})"
        )

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's grouping lengths: approximate tokens, positive with images, negative text-only.

        Estimated from word counts (no tokenization) so it is cheap for millions of rows; in slice
        mode every image counts as its worst case (the largest grid), since reading millions of
        image headers would be slow on network storage.
        """
        if self._lengths is None:
            self._lengths = [
                estimate_length(raw, self.builder.max_tokens_per_image) for _, _, raw in _iter(self.records)
            ]
        return self._lengths


def _iter(records: MixedRecords):
    return (records[i] for i in range(len(records)))


def estimate_length(raw: Any, tokens_per_image: int) -> int:
    """Words plus expanded image tokens; negative for text-only rows; 1 for unparsable rows."""
    try:
        turns = raw["conversations"]
        words = sum(len(str(turn["value"]).split()) for turn in turns)
        images = sum(str(turn["value"]).count(IMAGE_PLACEHOLDER) for turn in turns)
    except (KeyError, TypeError):
        return 1
    length = max(1, words + images * tokens_per_image)
    return length if images else -length


def build_dataset(
    sources: Sequence[DataSource],
    builder: SampleBuilder,
    *,
    on_bad_sample: BadSamplePolicy = "error",
) -> LlavaDataset:
    for source in sources:
        if source.image_folder is not None and not Path(source.image_folder).is_dir():
            raise FileNotFoundError(f"image folder {source.image_folder} does not exist")
    return LlavaDataset(MixedRecords(sources), builder, on_bad_sample=on_bad_sample)


class StreamingLlavaDataset(torch.utils.data.IterableDataset):
    """Iterable counterpart of ``LlavaDataset`` for data read as a stream (``--streaming``).

    Every rank reads the same stream; the Trainer's accelerate data loader (with
    ``dispatch_batches=False``, set by ``train.run``) keeps each rank's own batches and gives all
    ranks the same number of them, so none waits for another at the end. That costs each rank
    the preprocessing of every sample (accelerate 1.15 cannot be told that a stream is already
    split by rank: splitting it here as well kept 1/world_size of the data). Data-loader workers
    split the stream by its shards (files), which ``datasets`` does itself; bad rows follow the
    same policy as in ``LlavaDataset``.
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        builder: SampleBuilder,
        *,
        on_bad_sample: BadSamplePolicy = "error",
        seed: int = 0,
        shuffle_buffer: int = 0,
    ) -> None:
        """``shuffle_buffer``: rows are drawn at random from a buffer of this many (and the files'
        order shuffled), reseeded by ``set_epoch``; 0 reads the stream in order."""
        from tokenpacker_llava.data.sources import interleave_streaming

        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        folders = {source.image_folder for source in sources}
        if len(folders) > 1:
            raise ValueError("streaming mixes sources into one stream; give them a single image folder")
        self.image_folder = folders.pop()
        self.builder = builder
        self.on_bad_sample = on_bad_sample
        stream = interleave_streaming(sources, seed=seed)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        # The same seed on every rank: each rank must read the same stream (see above).
        self.stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else stream

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def load(self, raw: Any, row: int) -> dict[str, Any]:
        return self.builder.build(parse_record(raw, row=row, source="stream"), self.image_folder)

    def __iter__(self):
        from tokenpacker_llava.data.sources import raw_record

        skipped: list[str] = []
        for position, raw_row in enumerate(self.stream):
            row, raw = raw_record(raw_row)
            row = position if row is None else row
            sample = apply_policy(self.on_bad_sample, skipped, self.load, raw, row)
            if sample is None:
                continue
            if skipped:
                sample["skipped"], skipped = skipped, []
            yield sample
        if skipped:
            logger.warning("%d bad rows at the end of the stream were skipped", len(skipped))
