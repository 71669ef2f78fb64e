"""What one image becomes for the model in every image mode: pixel views plus the ids of its ``<image>``.

* ``pad`` / ``resize`` (LLaVA-1.5): one view made by ``ImagePreprocessor``; ``<image>`` expands to
  ``tokens_per_view`` placeholder ids.
* ``slice`` (TokenPacker-HD): the tiles and the global view of ``data.slicing``; ``<image>`` expands
  to their placeholder runs with the ``,`` and newline token ids between them.

``ImageMode`` holds the settings; ``ImageMode.from_config`` reads them from a model config, so
inference uses exactly what training stored there. ``ImageLoader`` turns paths (or PIL images)
into ``VisualInput``s. In slice mode an image's layout depends on its size, which
``ImageLoader.plan_path`` reads from the file header alone: a sample is tokenized, and its length
checked, before any pixel is decoded, and the same plan then cuts the decoded pixels.

Every view of every image is one ``(3, H, W)`` entry of the model's ``pixel_values``, in
placeholder order, so features never move between images or samples however many tiles each has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tokenpacker_llava.data.images import ImagePreprocessor, to_rgb
from tokenpacker_llava.data.slicing import (
    SlicePlan,
    candidate_grids,
    max_layout_length,
    plan_slices,
    slice_layout,
    slice_views,
    tiles_of,
)

IMAGE_MODES = ("pad", "resize", "slice")


@dataclass(frozen=True)
class ImageMode:
    """How images enter the model: preprocessing, tokens per view and, in slice mode, the layout."""

    aspect_ratio: str
    image_token_id: int
    tokens_per_view: int
    patch_num: int = 9
    separator_ids: tuple[int, int] | None = None  # (",", newline) token ids; slice mode only

    def __post_init__(self) -> None:
        if self.aspect_ratio not in IMAGE_MODES:
            raise ValueError(f"unknown image_aspect_ratio {self.aspect_ratio!r}; choose one of {IMAGE_MODES}")
        if self.tokens_per_view < 1:
            raise ValueError(f"tokens_per_view must be >= 1, got {self.tokens_per_view}")
        if not self.slicing:
            return
        candidate_grids(self.patch_num)  # a clear error for an unpublished patch_num
        ids = self.separator_ids
        if ids is None or len(ids) != 2 or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(
                f"slice mode needs the ',' and newline separator token ids, got {ids!r}; training stores "
                "them in the model config (slice_separator_ids), `tokenpacker-llava convert` sets them for "
                "reference checkpoints, and tokenization.slice_separator_ids(tokenizer) finds them"
            )
        object.__setattr__(self, "separator_ids", (ids[0], ids[1]))  # a list from a config, as a tuple

    @classmethod
    def from_config(cls, config: Any) -> ImageMode:
        """The mode a ``TokenPackerLlavaConfig`` describes."""
        if config.image_token_id is None:
            raise ValueError("the model config has no image_token_id")
        ids = getattr(config, "slice_separator_ids", None)
        return cls(
            aspect_ratio=config.image_aspect_ratio,
            image_token_id=config.image_token_id,
            tokens_per_view=config.num_image_tokens,
            patch_num=getattr(config, "patch_num", None) or 9,
            separator_ids=ids,
        )

    @property
    def slicing(self) -> bool:
        return self.aspect_ratio == "slice"

    @property
    def max_tokens_per_image(self) -> int:
        """The longest expansion of one ``<image>`` (its worst case in slice mode)."""
        if not self.slicing:
            return self.tokens_per_view
        return max_layout_length(self.patch_num, self.tokens_per_view)

    def token_ids(self, plan: SlicePlan | None = None) -> list[int]:
        """The ids one ``<image>`` expands to (slice mode: for the image ``plan`` describes)."""
        if not self.slicing:
            return [self.image_token_id] * self.tokens_per_view
        if plan is None:
            raise ValueError("slice mode lays out each image by its grid: pass its SlicePlan")
        assert self.separator_ids is not None  # checked in __post_init__
        return slice_layout(
            plan.rows,
            plan.cols,
            image_token_id=self.image_token_id,
            tokens_per_view=self.tokens_per_view,
            separator_ids=self.separator_ids,
        )


@dataclass(frozen=True)
class VisualInput:
    """One image, ready for the model."""

    pixel_values: torch.Tensor  # (views, 3, H, W): one view, or tiles row-major then the global view
    token_ids: list[int]  # what the image's <image> placeholder expands to
    plan: SlicePlan | None = None  # slice mode: the grid

    @property
    def num_views(self) -> int:
        return self.pixel_values.shape[0]


class ImageLoader:
    """Image paths or PIL images -> ``VisualInput`` for one ``ImageMode``.

    ``image_folder`` as for ``ImagePreprocessor`` (paths are relative to it and may not leave it).
    Unusable images raise ``BadSample`` naming the path.
    """

    def __init__(
        self, image_processor: Any, mode: ImageMode, *, image_folder: str | Path | None = None
    ) -> None:
        self.mode = mode
        # Slice mode uses the preprocessor only for opening files, the mean colour, the resample
        # filter and normalization, which do not depend on its aspect ratio.
        self.preprocessor = ImagePreprocessor(
            image_processor,
            aspect_ratio="pad" if mode.slicing else mode.aspect_ratio,
            image_folder=image_folder,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r}, {self.preprocessor!r})"

    @property
    def tile_hw(self) -> tuple[int, int]:
        """(height, width) of every view: the vision tower's input size as the processor makes it."""
        return self.preprocessor.size

    def resolve(self, path: str) -> Path:
        return self.preprocessor.resolve(path)

    def plan(self, size: tuple[int, int]) -> SlicePlan | None:
        """The slice plan of an image of ``size`` = (width, height); None outside slice mode."""
        if not self.mode.slicing:
            return None
        width, height = size
        return plan_slices(height, width, self.mode.patch_num, self.tile_hw)

    def plan_path(self, path: str) -> SlicePlan | None:
        """``plan`` for the image at ``path``, from its header (no decoding); None outside slice mode."""
        if not self.mode.slicing:
            return None
        return self.plan(self.preprocessor.image_size(path))

    def token_ids(self, plan: SlicePlan | None) -> list[int]:
        return self.mode.token_ids(plan)

    def load(self, path: str, plan: SlicePlan | None = None) -> VisualInput:
        """The image at ``path``; in slice mode cut by ``plan`` (default: planned from the header)."""
        if not self.mode.slicing:
            return VisualInput(self.preprocessor(path).unsqueeze(0), self.mode.token_ids())
        plan = plan or self.plan_path(path)
        assert plan is not None
        content_h, content_w = plan.content_hw
        # Decoding a large JPEG at reduced scale is safe: the plan comes from the full-size header.
        image = self.preprocessor.open(path, draft=True, min_size=(content_w, content_h))
        return self._sliced(image, plan)

    def __call__(self, path: str) -> VisualInput:
        return self.load(path)

    def from_image(self, image: Image.Image) -> VisualInput:
        """A PIL image (e.g. from an evaluation harness) as ``load`` would make it from a file."""
        if not self.mode.slicing:
            return VisualInput(self.preprocessor.preprocess(image).unsqueeze(0), self.mode.token_ids())
        image = to_rgb(image)
        plan = self.plan(image.size)
        assert plan is not None
        return self._sliced(image, plan)

    def _sliced(self, image: Image.Image, plan: SlicePlan) -> VisualInput:
        preprocessor = self.preprocessor
        canvas, overview = slice_views(
            to_rgb(image), plan, background=preprocessor.background, resample=preprocessor.resample
        )
        views = tiles_of(preprocessor.normalize(canvas), plan)
        if overview is not None:
            views = torch.cat([views, preprocessor.normalize(overview).unsqueeze(0)])
        return VisualInput(views, self.mode.token_ids(plan), plan)
