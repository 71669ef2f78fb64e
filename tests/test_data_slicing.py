"""Slice mode's data side: grid choice against the published rule, the views' pixels, the token
layout, the separator tokens, and tokenization with per-image expansions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers_util import train_byte_level_bpe
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from tokenpacker_llava.data.records import Turn
from tokenpacker_llava.data.slicing import (
    PATCH_NUMS,
    candidate_grids,
    choose_grid,
    layout_length,
    max_layout_length,
    plan_slices,
    slice_layout,
)
from tokenpacker_llava.data.templates import get_template
from tokenpacker_llava.data.tokenize import IGNORE_INDEX, tokenize_conversation, tokenize_prompt
from tokenpacker_llava.data.visual_inputs import ImageLoader, ImageMode
from tokenpacker_llava.models.configuration import SLICE_PATCH_NUMS
from tokenpacker_llava.tokenization import ensure_image_token, slice_separator_ids

TILE = (336, 336)
IMAGE_ID, COMMA, NEWLINE = 999, 5, 6


# --------------------------------------------------------------------------------------------
# Grid choice
# --------------------------------------------------------------------------------------------


def published_rule(height: int, width: int, patch_num: int, tile: int = 336) -> tuple[int, int]:
    """The scoring rule of REFERENCE.md §2, written out independently of the package."""
    candidates = [
        (rows, cols)
        for count in range(1, patch_num + 1)
        for rows in range(1, count + 1)
        for cols in [count // rows]
        if rows * cols == count and not (min(rows, cols) == 1 and max(rows, cols) > 9)
    ]
    best, best_score = None, -1.0
    for rows, cols in candidates:
        big_h, big_w = rows * tile, cols * tile
        ratio = min(big_h / height, big_w / width)
        fill = round(height * ratio) * round(width * ratio) / (big_h * big_w)
        inter = min(big_h, 1.4 * height) * min(big_w, 1.4 * width)
        iou = inter / (big_h * big_w + 1.96 * height * width - inter)
        if fill + 0.1 * iou > best_score:
            best, best_score = (rows, cols), fill + 0.1 * iou
    return best


SIZES = [
    (336, 336),
    (672, 336),
    (336, 1008),
    (1000, 700),
    (2000, 500),
    (4000, 3000),
    (100, 2000),
    (480, 480),
    (720, 720),
    (1, 1),
    (3000, 40),
]  # fmt: skip  (width, height)


@pytest.mark.parametrize("patch_num", PATCH_NUMS)
def test_grid_choice_follows_the_published_rule(patch_num: int) -> None:
    for width, height in SIZES:
        assert choose_grid(height, width, patch_num, TILE) == published_rule(height, width, patch_num), (
            width,
            height,
        )


@pytest.mark.parametrize(
    ("width", "height", "patch_num", "grid"),
    [
        (336, 336, 9, (1, 1)),  # fill 1 + 0.1/1.96 beats (2, 2): fill 1 + 0.1*0.49
        (480, 480, 9, (2, 2)),  # the 1.4x box is exactly the 2 x 2 canvas
        (720, 720, 9, (3, 3)),
        (672, 336, 9, (1, 2)),  # wide: (rows, cols) = (1, 2)
        (336, 1008, 9, (3, 1)),  # tall
        (1000, 700, 9, (2, 3)),  # fill 0.952 + 0.1*0.494 (hand-computed)
        (2000, 500, 9, (1, 4)),
        (2000, 500, 16, (2, 8)),  # fill 1 + 0.1*0.92 once 16 tiles are allowed
        (4000, 3000, 16, (3, 4)),
        (100, 2000, 25, (9, 1)),  # strips never exceed 9 tiles
    ],
)
def test_hand_checked_grids(width: int, height: int, patch_num: int, grid: tuple[int, int]) -> None:
    assert choose_grid(height, width, patch_num, TILE) == grid


def test_candidate_lists_follow_the_stated_rule() -> None:
    assert PATCH_NUMS == SLICE_PATCH_NUMS
    for patch_num in PATCH_NUMS:
        grids = candidate_grids(patch_num)
        expected = {
            (rows, cols)
            for rows in range(1, patch_num + 1)
            for cols in range(1, patch_num + 1)
            if rows * cols <= patch_num and not (min(rows, cols) == 1 and max(rows, cols) > 9)
        }
        assert len(grids) == len(set(grids)) and set(grids) == expected
        counts = [rows * cols for rows, cols in grids]
        assert counts == sorted(counts)  # by tile count, so ties across counts resolve as in the reference
    assert len(candidate_grids(9)) == 23 and candidate_grids(16)[:23] == candidate_grids(9)
    with pytest.raises(ValueError, match="patch_num must be one of"):
        candidate_grids(12)


def test_plans_and_layout_lengths() -> None:
    plan = plan_slices(700, 1000, 9, TILE)  # height, width
    assert (plan.rows, plan.cols, plan.num_views) == (2, 3, 7)
    assert plan.content_hw == (672, 960) and plan.global_hw == (235, 336)  # 700/1000 * 336 = 235.2
    single = plan_slices(336, 336, 9, TILE)
    assert single.num_views == 1 and single.content_hw == (336, 336)

    ids = slice_layout(3, 3, image_token_id=IMAGE_ID, tokens_per_view=144, separator_ids=(COMMA, NEWLINE))
    assert len(ids) == 9 * 144 + 6 + 3 + 144 + 1 == 1450 == layout_length(9, 144)
    assert ids.count(COMMA) == 6 and ids.count(NEWLINE) == 4 and ids.count(IMAGE_ID) == 10 * 144
    assert [i for i in ids if i != IMAGE_ID] == [COMMA, COMMA, NEWLINE] * 3 + [NEWLINE]
    assert ids[144] == COMMA and ids[3 * 144 + 2] == NEWLINE and ids[-1] == NEWLINE
    one = slice_layout(1, 1, image_token_id=IMAGE_ID, tokens_per_view=144, separator_ids=(COMMA, NEWLINE))
    assert one == [IMAGE_ID] * 144 + [NEWLINE] and layout_length(1, 144) == 145
    assert max_layout_length(9, 144) == 1450 and max_layout_length(16, 64) == 17 * 65


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loader() -> ImageLoader:
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size=336)
    mode = ImageMode("slice", image_token_id=IMAGE_ID, tokens_per_view=4, separator_ids=(COMMA, NEWLINE))
    return ImageLoader(processor, mode)


def normalized(loader: ImageLoader, colour: tuple[int, int, int]) -> torch.Tensor:
    return loader.preprocessor.normalize(Image.new("RGB", (1, 1), colour))[:, 0, 0]


def test_views_are_row_major_tiles_of_a_top_left_canvas_then_the_global_view(loader) -> None:
    red, blue = (220, 30, 30), (30, 60, 220)
    image = Image.new("RGB", (1000, 700), red)
    image.paste(blue, (0, 350, 1000, 700))  # bottom half blue
    visual = loader.from_image(image)
    plan = visual.plan
    assert (plan.rows, plan.cols) == (2, 3) and visual.pixel_values.shape == (7, 3, 336, 336)
    views = visual.pixel_values
    background = normalized(loader, loader.preprocessor.background)
    for index in range(6):
        # Row-major: tiles 0-2 are the top row (red), 3-5 the bottom row (blue).
        expected = normalized(loader, red if index < 3 else blue)
        torch.testing.assert_close(views[index, :, 168, 100], expected)
    # The content is 960 px wide on a 1008 px canvas: the last 48 columns are the mean colour.
    for index in (2, 5):
        torch.testing.assert_close(views[index, :, 168, 336 - 48 + 10], background)
        torch.testing.assert_close(views[index, :, 168, 336 - 48 - 10], views[index, :, 168, 100])
    # Global view: the canvas squeezed into the image's 235 x 336 box at the top left, mean below.
    overview = views[6]
    torch.testing.assert_close(overview[:, 50, 100], normalized(loader, red))
    torch.testing.assert_close(overview[:, 200, 100], normalized(loader, blue))
    torch.testing.assert_close(overview[:, 300, 100], background)
    assert visual.token_ids == slice_layout(2, 3, image_token_id=IMAGE_ID, tokens_per_view=4,
                                            separator_ids=(COMMA, NEWLINE))  # fmt: skip


def test_files_are_planned_from_their_full_size_header(loader, tmp_path) -> None:
    Image.new("RGB", (2000, 1500), (10, 200, 10)).save(tmp_path / "big.jpg", quality=90)
    visual = loader.load(str(tmp_path / "big.jpg"))
    assert visual.plan == plan_slices(1500, 2000, 9, TILE) and visual.num_views == visual.plan.num_views
    # EXIF orientation 6 (rotate 90°) swaps the size the plan sees.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (400, 100), (0, 0, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    assert loader.preprocessor.image_size(str(tmp_path / "rotated.jpg")) == (100, 400)
    assert loader.plan_path(str(tmp_path / "rotated.jpg")) == plan_slices(400, 100, 9, TILE)
    single = loader.from_image(Image.new("RGB", (300, 300)))
    assert single.num_views == 1 and len(single.token_ids) == 4 + 1


def test_slice_mode_needs_separators_and_a_published_patch_num() -> None:
    with pytest.raises(ValueError, match="separator token ids"):
        ImageMode("slice", image_token_id=IMAGE_ID, tokens_per_view=4)
    with pytest.raises(ValueError, match="patch_num must be one of"):
        ImageMode("slice", image_token_id=IMAGE_ID, tokens_per_view=4, patch_num=10, separator_ids=(1, 2))
    pad = ImageMode("pad", image_token_id=IMAGE_ID, tokens_per_view=4)
    assert pad.token_ids() == [IMAGE_ID] * 4 and pad.max_tokens_per_image == 4
    # The length-grouping sampler counts every slice-mode image as its worst case.
    hd = ImageMode("slice", image_token_id=IMAGE_ID, tokens_per_view=144, separator_ids=(COMMA, NEWLINE))
    assert hd.max_tokens_per_image == 1450


# --------------------------------------------------------------------------------------------
# Separator tokens
# --------------------------------------------------------------------------------------------


def test_separator_ids_are_real_tokens(llama_tokenizer) -> None:
    comma, newline = slice_separator_ids(llama_tokenizer)
    # The SentencePiece test tokenizer has neither a ',' nor a '\n' piece: its byte-fallback pieces.
    assert llama_tokenizer.convert_ids_to_tokens([comma, newline]) == ["<0x2C>", "<0x0A>"]
    assert llama_tokenizer.decode([comma]) == "," and llama_tokenizer.decode([newline]) == "\n"
    bpe = train_byte_level_bpe()
    comma, newline = slice_separator_ids(bpe)
    assert bpe.convert_ids_to_tokens([comma, newline]) == [",", "Ċ"]


def test_a_tokenizer_without_separators_is_a_clear_error() -> None:
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="no single token decoding to ','"):
        slice_separator_ids(tokenizer)


# --------------------------------------------------------------------------------------------
# Tokenization with per-image expansions
# --------------------------------------------------------------------------------------------


def test_each_image_expands_to_its_own_layout(llama_tokenizer) -> None:
    tokenizer = llama_tokenizer
    image_id = ensure_image_token(tokenizer)
    comma, newline = slice_separator_ids(tokenizer)
    template = get_template("vicuna_v1", tokenizer)
    layouts = [
        slice_layout(rows, cols, image_token_id=image_id, tokens_per_view=3, separator_ids=(comma, newline))
        for rows, cols in ((2, 2), (1, 1))
    ]
    turns = [
        Turn("user", "<image>\n<image>\nwhat is in the image?"),
        Turn("assistant", "a red square"),
        Turn("user", "and?"),
        Turn("assistant", "a blue circle"),
    ]
    sample = tokenize_conversation(
        turns, template, tokenizer, image_token_id=image_id, image_expansions=layouts, max_length=None
    )
    start = sample.input_ids.index(image_id)
    first, second = layouts
    assert sample.input_ids[start : start + len(first)] == first
    after = sample.input_ids[start + len(first) :]
    assert after[after.index(image_id) :][: len(second)] == second
    assert sample.input_ids.count(image_id) == 6 * 3 and sample.num_images == 2
    # The layouts, separators included, are never supervised.
    for position in range(start, start + len(first)):
        assert sample.labels[position] == IGNORE_INDEX
    # max_length counts the expanded layouts: the second pair is dropped to fit.
    short = tokenize_conversation(
        turns,
        template,
        tokenizer,
        image_token_id=image_id,
        image_expansions=layouts,
        max_length=len(sample.input_ids) - 1,
    )
    assert short.dropped_turns == 1 and short.input_ids.count(image_id) == 18
    prompt = tokenize_prompt(
        turns[:1], template, tokenizer, image_token_id=image_id, image_expansions=layouts
    )
    start = prompt.index(image_id)
    assert prompt[start : start + len(first)] == first and prompt.count(image_id) == 18
    with pytest.raises(ValueError, match="2 image placeholder\\(s\\) but 1 image"):
        tokenize_prompt(turns[:1], template, tokenizer, image_token_id=image_id, image_expansions=layouts[:1])
    with pytest.raises(ValueError, match="exactly one of tokens_per_image or image_expansions"):
        tokenize_prompt(turns[:1], template, tokenizer, image_token_id=image_id)
