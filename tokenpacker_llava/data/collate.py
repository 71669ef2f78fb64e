"""Collators: a list of dataset samples -> one model batch, padded or packed (padding-free).

A sample is ``{"input_ids": (L,), "labels": (L,) with -100 where unsupervised, "pixel_values":
(n_images, 3, H, W) or None}`` plus optional metadata ``row``, ``id``, ``skipped`` (descriptions
of bad rows the dataset skipped to produce it) and ``shortened`` (a description, when turns were
dropped or an answer cut to fit the length). Metadata never reaches the model: ``skipped`` and
``shortened`` are gathered into ``batch["skipped_samples"]`` / ``batch["shortened_samples"]`` (only
when non-empty) so the trainer can count them, and must be popped before ``model(**batch)``;
``row`` and ``id`` are dropped.

Both collators keep the model's image contract: ``pixel_values`` is the concatenation of the
samples' images in sample order, which is placeholder order across the batch (and inside the
packed row), so the model's ``masked_scatter`` puts every image into its own sample.

``PackedCollator`` concatenates all samples into one row and relies on transformers' packed
sequence support: ``position_ids`` restarting at 0 with no ``attention_mask`` make SDPA/eager
build a block-diagonal causal mask and FlashAttention use its varlen kernels. That detection is
skipped when a KV cache exists, so the packed batch carries ``use_cache=False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
MODEL_KEYS = frozenset({"input_ids", "labels", "pixel_values"})
METADATA_KEYS = frozenset({"row", "id", "skipped", "shortened"})
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _name(sample: Mapping[str, Any], index: int) -> str:
    # Errors name the dataset row/id when the sample carries them: the batch index alone is useless.
    parts = [f"sample {index}"]
    parts += [f"{key}={sample[key]!r}" for key in ("row", "id") if sample.get(key) is not None]
    return " ".join(parts)


def _checked(samples: Sequence[Mapping[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validate every sample and return its (input_ids, labels)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty batch")
    pairs = []
    for index, sample in enumerate(samples):
        name = _name(sample, index)
        unknown = set(sample) - MODEL_KEYS - METADATA_KEYS
        if unknown:
            # Strict on purpose: a key the collator does not know would be silently lost.
            raise ValueError(
                f"{name}: unknown keys {sorted(unknown)}; expected {sorted(MODEL_KEYS | METADATA_KEYS)}"
            )
        if "input_ids" not in sample or "labels" not in sample:
            raise ValueError(f"{name}: needs both 'input_ids' and 'labels'")
        input_ids, labels = sample["input_ids"], sample["labels"]
        for key, tensor in (("input_ids", input_ids), ("labels", labels)):
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1 or tensor.dtype not in INTEGER_DTYPES:
                raise ValueError(f"{name}: {key} must be a 1-D integer tensor, got {_describe(tensor)}")
        if input_ids.numel() == 0:
            raise ValueError(f"{name}: input_ids is empty")
        if input_ids.shape != labels.shape:
            raise ValueError(
                f"{name}: input_ids and labels lengths differ ({input_ids.numel()} != {labels.numel()})"
            )
        pixel_values = sample.get("pixel_values")
        if pixel_values is not None and (
            not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4
        ):
            raise ValueError(
                f"{name}: pixel_values must be (n_images, 3, H, W) or None, got {_describe(pixel_values)}"
            )
        skipped = sample.get("skipped")
        if skipped is not None and (
            not isinstance(skipped, (list, tuple)) or not all(isinstance(item, str) for item in skipped)
        ):
            raise ValueError(f"{name}: skipped must be a list of strings, got {skipped!r}")
        if not isinstance(sample.get("shortened", ""), str):
            raise ValueError(f"{name}: shortened must be a string, got {sample['shortened']!r}")
        pairs.append((input_ids.long(), labels.long()))
    return pairs


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _pixel_values(samples: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    images = [
        s["pixel_values"] for s in samples if s.get("pixel_values") is not None and len(s["pixel_values"])
    ]
    if not images:
        return None
    shapes = {tuple(image.shape[1:]) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"images of one batch must share (3, H, W); got {sorted(shapes)}")
    return torch.cat(images)


def _finish(samples: Sequence[Mapping[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    """Add what both layouts share: the images and the gathered ``skipped`` / ``shortened``
    descriptions."""
    images = _pixel_values(samples)
    if images is not None:
        batch["pixel_values"] = images
    skipped = [item for sample in samples for item in (sample.get("skipped") or ())]
    if skipped:
        batch["skipped_samples"] = skipped
    shortened = [sample["shortened"] for sample in samples if sample.get("shortened")]
    if shortened:
        batch["shortened_samples"] = shortened
    return batch


class PaddedCollator:
    """Right-pad to the longest sample (rounded up to ``pad_to_multiple_of``).

    Returns ``input_ids`` and ``attention_mask`` (batch, L), ``labels`` with -100 on padding,
    ``pixel_values`` when any sample has an image, ``skipped_samples`` / ``shortened_samples`` when
    any sample carries them.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pairs = _checked(samples)
        width = max(ids.numel() for ids, _ in pairs)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(pairs):
            input_ids[row, : ids.numel()] = ids
            labels[row, : ids.numel()] = labs
            attention_mask[row, : ids.numel()] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        return _finish(samples, batch)


class PackedCollator:
    """Concatenate all samples into one row (batch size 1), with no padding and no attention mask.

    Returns ``input_ids``, ``labels`` and ``position_ids`` of shape (1, T), ``pixel_values``,
    ``use_cache=False`` and, with ``return_flash_attn_kwargs``, ``cu_seq_lens_q/k`` (int32 sample
    boundaries, ``[0, L0, L0+L1, ..., T]``) and ``max_length_q/k`` (python int) for FlashAttention's
    varlen kernels (SDPA and eager ignore them and use ``position_ids``).

    Every sample's first label is set to -100: the causal LM shifts labels inside the row, so the
    last token of a sample would otherwise be trained to predict the next sample's first token.
    (It is never a target in the padded layout either, so losses are identical.)

    ``max_tokens`` is a guard, not a packer: a batch longer than it raises, since splitting it
    into several padded rows would bring the padding back. Size batches (batch size, sampler,
    model_max_length) so that it never happens.
    """

    def __init__(self, *, return_flash_attn_kwargs: bool = False, max_tokens: int | None = None) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self.max_tokens = max_tokens

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pairs = _checked(samples)
        lengths = [ids.numel() for ids, _ in pairs]
        total = sum(lengths)
        if self.max_tokens is not None and total > self.max_tokens:
            raise ValueError(
                f"packed batch of {len(pairs)} samples has {total} tokens > max_tokens={self.max_tokens} "
                f"(sample lengths {lengths}); lower the batch size or the maximum sample length"
            )
        labels = [labs.clone() for _, labs in pairs]
        for labs in labels:
            labs[0] = IGNORE_INDEX
        batch: dict[str, Any] = {
            "input_ids": torch.cat([ids for ids, _ in pairs]).unsqueeze(0),
            "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
            # With a cache (the LM's config default) transformers skips packed-sequence detection
            # and samples would attend to each other.
            "use_cache": False,
        }
        if self.return_flash_attn_kwargs:
            cu_seq_lens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
            batch["max_length_q"] = batch["max_length_k"] = max(lengths)
        return _finish(samples, batch)
