"""``data show``: one tokenized sample with its supervised spans marked."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from tokenpacker_llava.data.images import reference_image_processor
from tokenpacker_llava.data.records import BadSample, parse_record
from tokenpacker_llava.data.sources import MixedRecords, parse_data_path
from tokenpacker_llava.data.templates import ConversationTemplate
from tokenpacker_llava.data.tokenize import tokenize_conversation
from tokenpacker_llava.data.visual_inputs import ImageLoader, ImageMode
from tokenpacker_llava.tokenization import slice_separator_ids

IGNORE_INDEX = -100


def runs(input_ids: Sequence[int], labels: Sequence[int], image_token_id: int) -> list[tuple[str, list[int]]]:
    """Split a sample into maximal runs of kind ``image``, ``supervised`` or ``context``."""
    out: list[tuple[str, list[int]]] = []
    for token, label in zip(input_ids, labels, strict=True):
        kind = "image" if token == image_token_id else "supervised" if label != IGNORE_INDEX else "context"
        if out and out[-1][0] == kind:
            out[-1][1].append(token)
        else:
            out.append((kind, [token]))
    return out


def show_sample(
    data_path: Sequence[str],
    image_folder: str | None,
    *,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    template: ConversationTemplate,
    image_token_id: int,
    tokens_per_image: int,
    max_length: int | None,
    as_json: bool = False,
    patch_num: int | None = None,
    image_processor: Any = None,
) -> int:
    """Print sample ``index``. ``patch_num`` renders slice mode (TokenPacker-HD): each image
    becomes its own tile grid + global view with the real ',' / newline separator tokens, planned
    from its size and ``image_processor``'s view size (default: CLIP-L/336's 336 px)."""
    records = MixedRecords(parse_data_path(list(data_path), image_folder))
    if not 0 <= index < len(records):
        raise SystemExit(f"--index {index} is out of range: the data has {len(records)} samples")
    source, row, raw = records[index]
    record = parse_record(raw, row=row, source=source.path)
    expansion: dict[str, Any] = {"tokens_per_image": tokens_per_image}
    grids = []
    if patch_num is not None:
        mode = ImageMode(
            "slice",
            image_token_id=image_token_id,
            tokens_per_view=tokens_per_image,
            patch_num=patch_num,
            separator_ids=slice_separator_ids(tokenizer),
        )
        images = ImageLoader(
            image_processor or reference_image_processor(), mode, image_folder=source.image_folder
        )
        layouts = []
        for path in record.images:
            try:
                plan = images.plan_path(path)
            except BadSample as error:
                raise error.at(record.row, record.id) from None
            grids.append(f"{plan.rows}x{plan.cols}")
            layouts.append(images.token_ids(plan))
        expansion = {"image_expansions": layouts}
    sample = tokenize_conversation(
        record.turns,
        template,
        tokenizer,
        image_token_id=image_token_id,
        max_length=max_length,
        **expansion,
    )
    parts = runs(sample.input_ids, sample.labels, image_token_id)
    supervised = [tokenizer.decode(tokens) for kind, tokens in parts if kind == "supervised"]
    if as_json:
        json.dump(
            {
                "index": index,
                "source": source.path,
                "row": record.row,
                "id": record.id,
                "num_tokens": len(sample.input_ids),
                "num_supervised": sum(label != IGNORE_INDEX for label in sample.labels),
                "num_images": sample.num_images,
                "slice_grids": grids,
                "dropped_turns": sample.dropped_turns,
                "truncated_answer": sample.truncated_answer,
                "input_ids": sample.input_ids,
                "labels": sample.labels,
                "supervised_text": supervised,
            },
            sys.stdout,
            ensure_ascii=False,
        )
        print()
        return 0
    color = sys.stdout.isatty()
    start, end = ("\033[1;32m", "\033[0m") if color else ("⟦", "⟧")
    pieces = []
    for kind, tokens in parts:
        if kind == "image":
            pieces.append(f"<image x{len(tokens)}>")
        elif kind == "supervised":
            pieces.append(f"{start}{tokenizer.decode(tokens)}{end}")
        else:
            pieces.append(tokenizer.decode(tokens))
    print(f"sample {index}: {source.path} row {record.row} id {record.id!r}")
    print(
        f"{len(sample.input_ids)} tokens, {sum(label != IGNORE_INDEX for label in sample.labels)} supervised "
        f"(marked {start}like this{end}), {sample.num_images} image(s) x {tokens_per_image} tokens"
        + (f" per view (slice grids {', '.join(grids)} + a global view each)" if grids else "")
    )
    if sample.dropped_turns or sample.truncated_answer:
        print(f"shortened to {max_length} tokens: dropped {sample.dropped_turns} turn pair(s)")
    print("-" * 60)
    print("".join(pieces))
    return 0
