"""Modality- and length-grouped sampling (LLaVA-1.5's ``group_by_modality_length``).

Lengths are signed: ``> 0`` for samples with images, ``< 0`` for text-only ones (see
``modality_lengths``). Each epoch, every modality is shuffled and cut into megabatches of
``batch_size * world_size`` indices; a megabatch is sorted by length (longest first) and dealt
into ``world_size`` batches of ``batch_size`` with balanced token totals, so ranks pad little
and finish their step at about the same time. Full megabatches of both modalities are then
shuffled together; the two partial tails form one leftover group at the end, the only place
where a batch may mix modalities.

The sampler only orders indices, so it serves padded and packed collation alike. With a
``DataLoader(batch_size=batch_size)`` sharded across ranks the usual way (batch ``k`` to rank
``k % world_size``), each step's batches come from one megabatch. LLaVA passes the number of
ranks times the gradient-accumulation steps as ``world_size``, grouping a whole optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def modality_lengths(num_tokens: Sequence[int], has_image: Sequence[bool]) -> list[int]:
    """Signed lengths for ``ModalityLengthGroupedSampler``: ``+n`` with an image, ``-n`` text-only."""
    if len(num_tokens) != len(has_image):
        raise ValueError(f"num_tokens and has_image lengths differ ({len(num_tokens)} != {len(has_image)})")
    lengths = []
    for index, (n, image) in enumerate(zip(num_tokens, has_image, strict=True)):
        if n <= 0:
            # 0 would be neither modality; a sample always has at least one token.
            raise ValueError(f"sample {index} has {n} tokens; token counts must be positive")
        lengths.append(int(n) if image else -int(n))
    return lengths


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yield every index once per epoch, grouped by modality and length (see the module docstring).

    Deterministic for a given ``(seed, epoch)``; call ``set_epoch`` before each epoch (the HF
    Trainer/accelerate do) to get a new order. Every rank must use the same seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        zeros = [index for index, length in enumerate(lengths) if length == 0]
        if zeros:
            raise ValueError(
                f"length 0 at indices {zeros[:10]}: use > 0 for samples with images, < 0 for text-only"
            )
        self.lengths = [int(length) for length in lengths]
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def indices(self) -> list[int]:
        """This epoch's order."""
        generator = torch.Generator()
        # Mix seed and epoch so that (seed, epoch + 1) does not replay (seed + 1, epoch).
        generator.manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        megabatch_size = self.batch_size * self.world_size
        full: list[list[int]] = []
        tails: list[list[int]] = []
        for with_image in (True, False):
            group = [index for index, length in enumerate(self.lengths) if (length > 0) == with_image]
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            for start in range(0, len(order), megabatch_size):
                chunk = self._by_length(order[start : start + megabatch_size])
                (full if len(chunk) == megabatch_size else tails).append(chunk)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        # The image tail then the text tail, each longest first: only the batch straddling the
        # boundary mixes modalities. (LLaVA orders this leftover by index instead.)
        leftover = [index for tail in tails for index in tail]
        return [index for megabatch in shuffled for index in megabatch] + leftover

    def _by_length(self, megabatch: list[int]) -> list[int]:
        """Longest first, dealt into ``world_size`` batches with balanced token totals."""
        ranked = sorted(megabatch, key=lambda index: abs(self.lengths[index]), reverse=True)
        if len(ranked) < self.batch_size * self.world_size:
            return ranked  # a partial tail is not split evenly across ranks anyway
        batches: list[list[int]] = [[] for _ in range(self.world_size)]
        totals = [0] * self.world_size
        for index in ranked:
            # Greedy: the next longest goes to the open batch with the fewest tokens so far.
            target = min(
                (rank for rank in range(self.world_size) if len(batches[rank]) < self.batch_size),
                key=lambda rank: totals[rank],
            )
            batches[target].append(index)
            totals[target] += abs(self.lengths[index])
        return [index for batch in batches for index in batch]
