"""TokenPacker-HD's ``slice`` mode: the tile grid of an image, its views, and its token layout.

Facts of the published design (REFERENCE.md §2; the reference's ``llava/patch_divide.py`` and
``llava/train/train.py``), for an image of ``h x w`` pixels and tiles of the vision tower's input
size ``th x tw`` (336 x 336 for CLIP-L/336):

* **Grid.** Each candidate ``(rows, cols)`` defines a canvas ``H x W = rows*th x cols*tw``, scored
  ``round(h*r) * round(w*r) / (H*W) + 0.1 * IoU([0,0,H,W], [0,0,1.4h,1.4w])`` with
  ``r = min(H/h, W/w)``: the fraction of the canvas the resized image fills, plus a small bonus
  for canvases close to 1.4 times the image. The highest score wins; on a tie the earlier
  candidate (``candidate_grids``) wins, as ``torch.argmax`` does in the reference.
* **Canvas.** The image is resized keeping its aspect ratio to fit the canvas, placed at the top
  left, and the rest is the processor's mean colour (the reference pads a normalized tensor with
  zeros, i.e. with the mean). Tiles are cut row-major.
* **Global view** (only when there is more than one tile): the whole canvas, padding included, is
  resized to the box that fits the *image's* aspect ratio into one tile, placed at the top left of
  a mean-colour tile. This is what the reference's training code does (it resizes the padded canvas,
  not the original image); it stretches the content slightly when the canvas's aspect ratio differs
  from the image's, and is kept so that released checkpoints see the inputs they were trained on.
* **Tokens.** Per tile row, the tiles' tokens separated by the ``,`` token and the row ended by a
  newline token; then the global view's tokens and a newline. Every view therefore contributes
  ``tokens_per_view + 1`` tokens: a 3 x 3 grid at 144 tokens per view is 9*144 + 6 + 3 + 144 + 1 =
  1450 tokens, a single tile 145.

Differences from the reference that do not change the design: the score is evaluated in float64
(the reference uses float32 and a 1e-5 epsilon in the IoU's union; on 45,600 image sizes per
``patch_num``, measured once, the chosen grids were identical), and pixels are resized with the image processor's
filter on 8-bit images (antialiased) where the reference interpolates the normalized float tensor
bilinearly without antialiasing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

# The reference's candidate grids (rows, cols) for patch_num 25, in its order. The lists for 9 and 16
# are the prefixes with rows*cols <= patch_num (the reference lists candidates by tile count), so one
# table serves all three. The set is every (rows, cols) with rows*cols <= patch_num, except the
# 1 x n and n x 1 strips longer than 9 (tests/test_data_slicing.py checks this rule); the reference
# lists (4, 6) and (6, 4) twice, which changes nothing. The order only matters for exact score ties,
# where the first candidate wins.
_REFERENCE_CANDIDATES: tuple[tuple[int, int], ...] = (
    (1, 1),
    (1, 2), (2, 1),
    (1, 3), (3, 1),
    (2, 2), (1, 4), (4, 1),
    (1, 5), (5, 1),
    (1, 6), (6, 1), (2, 3), (3, 2),
    (1, 7), (7, 1),
    (4, 2), (2, 4), (1, 8), (8, 1),
    (3, 3), (1, 9), (9, 1),
    (2, 5), (5, 2),
    (2, 6), (6, 2), (3, 4), (4, 3),
    (2, 7), (7, 2),
    (3, 5), (5, 3),
    (2, 8), (8, 2), (4, 4),
    (3, 6), (6, 3), (2, 9), (9, 2),
    (4, 5), (5, 4), (2, 10), (10, 2),
    (3, 7), (7, 3),
    (11, 2), (2, 11),
    (4, 6), (6, 4), (12, 2), (2, 12), (3, 8), (8, 3),
    (5, 5),
)  # fmt: skip
PATCH_NUMS = (9, 16, 25)
# Bonus weight and scale of the reference's score (see the module docstring).
_IOU_WEIGHT = 0.1
_IOU_SCALE = 1.4


def candidate_grids(patch_num: int) -> tuple[tuple[int, int], ...]:
    """The (rows, cols) grids considered for ``patch_num`` (9, 16 or 25), in tie-breaking order."""
    if patch_num not in PATCH_NUMS:
        raise ValueError(
            f"patch_num must be one of {PATCH_NUMS} (the published candidate lists), got {patch_num!r}"
        )
    return tuple(grid for grid in _REFERENCE_CANDIDATES if grid[0] * grid[1] <= patch_num)


def grid_score(height: int, width: int, rows: int, cols: int, tile_hw: tuple[int, int]) -> float:
    """The published score of the ``rows x cols`` canvas for an ``height x width`` image."""
    canvas_h, canvas_w = rows * tile_hw[0], cols * tile_hw[1]
    ratio = min(canvas_h / height, canvas_w / width)
    area = canvas_h * canvas_w
    fill = round(height * ratio) * round(width * ratio) / area
    box_h, box_w = _IOU_SCALE * height, _IOU_SCALE * width
    intersection = min(canvas_h, box_h) * min(canvas_w, box_w)
    iou = intersection / (area + box_h * box_w - intersection)
    return fill + _IOU_WEIGHT * iou


def choose_grid(height: int, width: int, patch_num: int, tile_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) with the highest ``grid_score``; the first candidate wins ties."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    best, best_score = None, float("-inf")
    for rows, cols in candidate_grids(patch_num):
        score = grid_score(height, width, rows, cols, tile_hw)
        if score > best_score:  # strict: an equal later score does not replace the first
            best, best_score = (rows, cols), score
    assert best is not None
    return best


def fit_size(height: int, width: int, box_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an ``height x width`` image resized keeping its aspect ratio to fit ``box_hw``.

    The side that limits the scale fills the box exactly; the other is rounded and clamped to it,
    as in the reference.
    """
    box_h, box_w = box_hw
    scale_h, scale_w = box_h / height, box_w / width
    if scale_h <= scale_w:
        return box_h, max(1, min(box_w, round(width * scale_h)))
    return max(1, min(box_h, round(height * scale_w))), box_w


@dataclass(frozen=True)
class SlicePlan:
    """Where an image's pixels go in slice mode; computed from its full-resolution size only."""

    rows: int
    cols: int
    tile_hw: tuple[int, int]
    image_hw: tuple[int, int]  # the original image (after EXIF orientation)
    content_hw: tuple[int, int]  # the resized image on the canvas (top left)
    global_hw: tuple[int, int]  # the resized canvas in the global view (top left)

    @property
    def num_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def num_views(self) -> int:
        """Tiles plus the global view, which exists only when there is more than one tile."""
        return self.num_tiles + (1 if self.num_tiles > 1 else 0)

    @property
    def canvas_hw(self) -> tuple[int, int]:
        return self.rows * self.tile_hw[0], self.cols * self.tile_hw[1]


def plan_slices(height: int, width: int, patch_num: int, tile_hw: tuple[int, int]) -> SlicePlan:
    """The grid, canvas content size and global-view size for an ``height x width`` image."""
    rows, cols = choose_grid(height, width, patch_num, tile_hw)
    return SlicePlan(
        rows=rows,
        cols=cols,
        tile_hw=tile_hw,
        image_hw=(height, width),
        content_hw=fit_size(height, width, (rows * tile_hw[0], cols * tile_hw[1])),
        global_hw=fit_size(height, width, tile_hw),
    )


def slice_views(
    image: Image.Image, plan: SlicePlan, *, background: tuple[int, int, int], resample: Image.Resampling
) -> tuple[Image.Image, Image.Image | None]:
    """(canvas, global view or None) of an RGB ``image`` for ``plan``; tiles are the canvas cut row-major.

    ``image`` may be smaller than ``plan.image_hw`` (a JPEG decoded at reduced scale): it is resized to
    ``plan.content_hw`` either way.
    """
    canvas_h, canvas_w = plan.canvas_hw
    content_h, content_w = plan.content_hw
    content = (
        image if image.size == (content_w, content_h) else image.resize((content_w, content_h), resample)
    )
    canvas = Image.new("RGB", (canvas_w, canvas_h), background)
    canvas.paste(content, (0, 0))
    if plan.num_tiles == 1:
        return canvas, None
    tile_h, tile_w = plan.tile_hw
    global_h, global_w = plan.global_hw
    overview = Image.new("RGB", (tile_w, tile_h), background)
    overview.paste(canvas.resize((global_w, global_h), resample), (0, 0))
    return canvas, overview


def tiles_of(canvas: torch.Tensor, plan: SlicePlan) -> torch.Tensor:
    """(rows*cols, C, th, tw): the normalized ``(C, H, W)`` canvas cut into tiles, row-major."""
    channels = canvas.shape[0]
    tile_h, tile_w = plan.tile_hw
    grid = canvas.reshape(channels, plan.rows, tile_h, plan.cols, tile_w)
    return grid.permute(1, 3, 0, 2, 4).reshape(plan.num_tiles, channels, tile_h, tile_w)


# --------------------------------------------------------------------------------------------
# Token layout
# --------------------------------------------------------------------------------------------


def slice_layout(
    rows: int, cols: int, *, image_token_id: int, tokens_per_view: int, separator_ids: Sequence[int]
) -> list[int]:
    """The token ids one ``<image>`` of a ``rows x cols`` grid expands to.

    ``separator_ids`` = (the ``,`` token, the newline token). Image features replace the
    ``image_token_id`` runs in view order (tiles row-major, then the global view); the separators
    stay ordinary tokens, embedded by the LLM's embedding table.
    """
    comma, newline = separator_ids
    view = [image_token_id] * tokens_per_view
    ids: list[int] = []
    for _ in range(rows):
        for col in range(cols):
            ids += view
            ids.append(comma if col < cols - 1 else newline)
    if rows * cols > 1:
        ids += view
        ids.append(newline)
    return ids


def layout_length(num_tiles: int, tokens_per_view: int) -> int:
    """Tokens of an image with ``num_tiles`` tiles: every view brings its tokens and one separator."""
    views = num_tiles + (1 if num_tiles > 1 else 0)
    return views * (tokens_per_view + 1)


def max_layout_length(patch_num: int, tokens_per_view: int) -> int:
    """The longest layout any image can get with ``patch_num`` (the largest grid plus the global view)."""
    return max(layout_length(rows * cols, tokens_per_view) for rows, cols in candidate_grids(patch_num))
