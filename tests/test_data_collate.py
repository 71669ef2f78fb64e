"""Padded and packed (padding-free) collation, and the modality/length-grouped sampler.

The packed layout must be a pure layout change: the same per-sample logits, losses and
gradients as the padded batch, and no attention across the samples of the packed row (with
SDPA and its block mask, with per-sample SDPA (``sdpa_varlen``) and with eager attention).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.data_loader import BatchSamplerShard
from conftest import IMAGE_SIZE, IMAGE_TOKEN_ID, VOCAB_SIZE, tiny_model
from torch.utils.data import BatchSampler, DataLoader

from tokenpacker_llava import TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.data.collate import PackedCollator, PaddedCollator
from tokenpacker_llava.data.sampler import ModalityLengthGroupedSampler, modality_lengths

PAD = 0
# (with image, text tokens before the image, text tokens after it, supervised tail length)
SPECS = ((True, 3, 6, 4), (False, 9, 0, 5), (True, 1, 10, 7), (False, 14, 0, 9), (True, 5, 2, 2))


def make_samples(num_image_tokens: int, seed: int = 0) -> list[dict]:
    """BOS, text, the expanded image placeholder (image samples), text; only the tail supervised."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for row, (with_image, before, after, supervised) in enumerate(SPECS):
        text = torch.randint(3, VOCAB_SIZE, (before + after,), generator=generator).tolist()
        image = [IMAGE_TOKEN_ID] * num_image_tokens if with_image else []
        input_ids = torch.tensor([1, *text[:before], *image, *text[before:]])
        labels = input_ids.clone()
        labels[: len(input_ids) - supervised] = -100
        pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) if with_image else None
        samples.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "pixel_values": pixel_values,
                "row": row,
                "id": f"s{row}",
            }
        )
    return samples


def spans(samples: list[dict]) -> list[slice]:
    """Where each sample lies in the packed row."""
    out, start = [], 0
    for sample in samples:
        out.append(slice(start, start + len(sample["input_ids"])))
        start += len(sample["input_ids"])
    return out


def padded_logits(model: torch.nn.Module, samples: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    out = model(**PaddedCollator(PAD)(samples))
    return [out.logits[i, : len(s["input_ids"])] for i, s in enumerate(samples)], out.loss


def packed_logits(
    model: torch.nn.Module, samples: list[dict], **kw
) -> tuple[list[torch.Tensor], torch.Tensor]:
    out = model(**{**PackedCollator()(samples), **kw})
    return [out.logits[0, span] for span in spans(samples)], out.loss


def sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Shift inside the sample: token t predicts label t + 1.
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


@pytest.fixture(scope="module")
def model() -> TokenPackerLlavaForConditionalGeneration:
    return tiny_model()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder: Path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    return folder


def load_with(folder: Path, attention: str) -> TokenPackerLlavaForConditionalGeneration:
    loaded = TokenPackerLlavaForConditionalGeneration.from_pretrained(
        folder, attn_implementation=attention
    ).eval()
    assert loaded.language_model.config._attn_implementation == attention
    return loaded


@pytest.fixture(scope="module")
def eager_model(saved_model: Path) -> TokenPackerLlavaForConditionalGeneration:
    return load_with(saved_model, "eager")


@pytest.fixture(scope="module")
def varlen_model(saved_model: Path) -> TokenPackerLlavaForConditionalGeneration:
    return load_with(saved_model, "sdpa_varlen")


# The fixture of each attention backend (`model` is the default, sdpa).
BACKENDS = {"sdpa": "model", "eager": "eager_model", "sdpa_varlen": "varlen_model"}


@pytest.fixture(scope="module")
def samples(model: TokenPackerLlavaForConditionalGeneration) -> list[dict]:
    assert model.num_image_tokens == 36
    return make_samples(model.num_image_tokens)


# ---------------------------------------------------------------- packed == padded


@pytest.mark.parametrize("attention", BACKENDS)
@torch.no_grad()
def test_packed_matches_padded_logits_and_losses(attention, request, samples) -> None:
    model = request.getfixturevalue(BACKENDS[attention])
    padded, padded_loss = padded_logits(model, samples)
    packed, packed_loss = packed_logits(model, samples)
    for i, (a, b, sample) in enumerate(zip(padded, packed, samples, strict=True)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"logits of sample {i}")
        la, lb = sample_loss(a, sample["labels"]), sample_loss(b, sample["labels"])
        assert abs(float(la - lb)) < 1e-4, (i, float(la), float(lb))
    # The LM's own loss: mean over the same supervised tokens in both layouts.
    assert abs(float(packed_loss - padded_loss)) < 1e-4
    supervised = sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    total = sum(
        sample_loss(b, s["labels"]) * int((s["labels"][1:] != -100).sum())
        for b, s in zip(packed, samples, strict=True)
    )
    assert abs(float(total / supervised - packed_loss)) < 1e-5


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_varlen"])
def test_packed_gradients_match_padded(attention, saved_model, samples) -> None:
    # eval() only disables dropout (none here anyway); gradients flow as in training.
    model = load_with(saved_model, attention)
    grads = []
    for collator in (PaddedCollator(PAD), PackedCollator()):
        model.zero_grad()
        model(**collator(samples)).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    padded, packed = grads
    assert padded.keys() == packed.keys()
    projector = [name for name in padded if name.startswith("projector.")]
    assert projector and all(padded[name].abs().sum() > 0 for name in projector)
    for name in padded:  # the projector, and every other trained weight as well
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- no attention across samples


@pytest.mark.parametrize("attention", BACKENDS)
@torch.no_grad()
def test_no_attention_across_packed_samples(attention, request, samples) -> None:
    model = request.getfixturevalue(BACKENDS[attention])
    before, _ = packed_logits(model, samples)
    changed = [dict(s) for s in samples]
    ids = changed[0]["input_ids"].clone()
    ids[2] = (ids[2] + 1) % VOCAB_SIZE  # a text token before the image
    changed[0]["input_ids"] = ids
    changed[0]["pixel_values"] = samples[0]["pixel_values"] + 1.0  # and its image
    after, _ = packed_logits(model, changed)
    assert (after[0] - before[0]).abs().max() > 1e-2  # sample 0 sees its own change
    for i in range(1, len(samples)):
        torch.testing.assert_close(after[i], before[i], atol=1e-6, rtol=0, msg=f"sample {i} saw sample 0")


@torch.no_grad()
def test_packed_needs_no_cache(model, samples) -> None:
    # Why the packed batch carries use_cache=False: with a cache (the LM config's default)
    # transformers skips packed-sequence detection and the samples attend to each other.
    assert PackedCollator()(samples)["use_cache"] is False
    reference, _ = padded_logits(model, samples)
    leaked, _ = packed_logits(model, samples, use_cache=True)
    assert (leaked[1] - reference[1]).abs().max() > 1e-2


@torch.no_grad()
def test_flash_attn_kwargs_are_accepted(model, samples) -> None:
    # SDPA ignores the varlen kwargs (they are for flash_attention_2) but they must pass through.
    batch = PackedCollator(return_flash_attn_kwargs=True)(samples)
    reference, _ = packed_logits(model, samples)
    logits = model(**batch).logits
    for span, expected in zip(spans(samples), reference, strict=True):
        torch.testing.assert_close(logits[0, span], expected, atol=0, rtol=0)


# ---------------------------------------------------------------- collator details


def test_padded_collator_layout(samples) -> None:
    batch = PaddedCollator(PAD, pad_to_multiple_of=8)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    width = -(-max(lengths) // 8) * 8
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, width)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for i, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][i, :n], sample["input_ids"])
        assert (batch["input_ids"][i, n:] == PAD).all()
        assert torch.equal(batch["labels"][i, :n], sample["labels"])
        assert (batch["labels"][i, n:] == -100).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    # Images in sample order, skipping the text-only samples in between.
    expected = torch.cat([s["pixel_values"] for s in samples if s["pixel_values"] is not None])
    assert torch.equal(batch["pixel_values"], expected)
    assert PaddedCollator(PAD)(samples)["input_ids"].shape == (5, max(lengths))


def test_text_only_batches_have_no_pixel_values(samples) -> None:
    text_only = [s for s in samples if s["pixel_values"] is None]
    assert "pixel_values" not in PaddedCollator(PAD)(text_only)
    assert "pixel_values" not in PackedCollator()(text_only)


def test_packed_collator_layout(samples) -> None:
    batch = PackedCollator(return_flash_attn_kwargs=True)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    total = sum(lengths)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert torch.equal(batch["input_ids"][0], torch.cat([s["input_ids"] for s in samples]))
    for span, sample in zip(spans(samples), samples, strict=True):
        labels = batch["labels"][0, span]
        assert labels[0] == -100  # no prediction across the boundary
        assert torch.equal(labels[1:], sample["labels"][1:])
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 46, 56, 104, 119, 163]
    assert cu.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch["cu_seq_lens_k"] is cu
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert isinstance(batch["max_length_q"], int)
    assert batch["use_cache"] is False
    assert torch.equal(batch["pixel_values"], PaddedCollator(PAD)(samples)["pixel_values"])
    assert "cu_seq_lens_q" not in PackedCollator()(samples)
    # A supervised first token is masked in the packed row only (it is never a target anyway).
    first = dict(samples[1], labels=samples[1]["input_ids"].clone())
    assert PackedCollator()([samples[0], first])["labels"][0, 46] == -100


def test_packed_max_tokens(samples) -> None:
    total = sum(len(s["input_ids"]) for s in samples)
    assert PackedCollator(max_tokens=total)(samples)["input_ids"].shape == (1, total)
    with pytest.raises(ValueError, match=f"has {total} tokens > max_tokens={total - 1}"):
        PackedCollator(max_tokens=total - 1)(samples)


def test_skipped_samples_are_gathered_and_metadata_dropped(samples) -> None:
    with_skips = [dict(s) for s in samples]
    with_skips[1]["skipped"] = ["row 7 (id a): missing_image"]
    with_skips[3]["skipped"] = ["row 9 (id b): corrupt_image", "row 10 (id c): empty_answer"]
    expected = ["row 7 (id a): missing_image", "row 9 (id b): corrupt_image", "row 10 (id c): empty_answer"]
    with_skips[2]["shortened"] = "row 8, id 'd': shortened to fit 64 tokens, dropped 1 turn pair(s)"
    for collator in (PaddedCollator(PAD), PackedCollator()):
        batch = collator(with_skips)
        assert batch["skipped_samples"] == expected
        assert batch["shortened_samples"] == [with_skips[2]["shortened"]]
        assert not {"row", "id", "skipped", "shortened"} & set(batch)
        assert not {"skipped_samples", "shortened_samples"} & set(collator(samples))


@pytest.mark.parametrize("collator", [PaddedCollator(PAD), PackedCollator()], ids=["padded", "packed"])
def test_collator_errors(collator, samples) -> None:
    def broken(**change) -> list[dict]:
        return [samples[0], {**samples[1], **change}]

    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(
        ValueError, match=r"sample 1 row=1 id='s1': input_ids and labels lengths differ \(10 != 9\)"
    ):
        collator(broken(labels=samples[1]["labels"][:-1]))
    with pytest.raises(ValueError, match="input_ids must be a 1-D integer tensor"):
        collator(broken(input_ids=samples[1]["input_ids"][None]))
    with pytest.raises(ValueError, match="labels must be a 1-D integer tensor"):
        collator(broken(labels=samples[1]["labels"].float()))
    with pytest.raises(ValueError, match="input_ids is empty"):
        collator(
            broken(input_ids=torch.tensor([], dtype=torch.long), labels=torch.tensor([], dtype=torch.long))
        )
    with pytest.raises(ValueError, match="needs both 'input_ids' and 'labels'"):
        collator([{"input_ids": samples[1]["input_ids"]}])
    with pytest.raises(ValueError, match=r"unknown keys \['attention_mask'\]"):
        collator(broken(attention_mask=torch.ones(10)))
    with pytest.raises(ValueError, match=r"pixel_values must be \(n_images, 3, H, W\)"):
        collator(broken(pixel_values=torch.zeros(3, 8, 8)))
    with pytest.raises(ValueError, match="skipped must be a list of strings"):
        collator(broken(skipped="row 3: corrupt_image"))
    with pytest.raises(ValueError, match="images of one batch must share"):
        collator(broken(pixel_values=torch.zeros(1, 3, 8, 8)))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PaddedCollator(PAD, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="max_tokens"):
        PackedCollator(max_tokens=0)


# ---------------------------------------------------------------- sampler


def signed_lengths(num_images: int = 37, num_texts: int = 23, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    images = (torch.randint(40, 200, (num_images,), generator=generator)).tolist()
    texts = (-torch.randint(5, 150, (num_texts,), generator=generator)).tolist()
    order = torch.randperm(num_images + num_texts, generator=generator).tolist()
    both = images + texts
    return [both[i] for i in order]


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def is_pure(batch: list[int], lengths: list[int]) -> bool:
    return len({lengths[i] > 0 for i in batch}) == 1


def test_modality_lengths() -> None:
    assert modality_lengths([5, 7, 3], [True, False, True]) == [5, -7, 3]
    with pytest.raises(ValueError, match="lengths differ"):
        modality_lengths([5], [True, False])
    with pytest.raises(ValueError, match="sample 1 has 0 tokens"):
        modality_lengths([5, 0], [True, False])


def test_sampler_covers_every_index_deterministically() -> None:
    lengths = signed_lengths()
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, seed=3)
    first = list(sampler)
    assert len(sampler) == len(first) == len(lengths)
    assert sorted(first) == list(range(len(lengths)))
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=4, seed=3)) == first  # same (seed, epoch)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(len(lengths))) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=4, seed=4)) != first


@pytest.mark.parametrize("epoch", range(4))
def test_sampler_batches_are_pure_and_sorted(epoch: int) -> None:
    lengths = signed_lengths()  # 37 with images, 23 text-only
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, seed=0)
    sampler.set_epoch(epoch)
    order = list(sampler)
    full = (37 // 4 + 23 // 4) * 4  # full megabatches (world_size 1: megabatch = batch)
    for megabatch in batches_of(order[:full], 4):
        assert is_pure(megabatch, lengths)
        sizes = [abs(lengths[i]) for i in megabatch]
        assert sizes == sorted(sizes, reverse=True)
    # The leftover (1 image + 3 text samples here) is the only mixed part: images, then text.
    leftover = order[full:]
    assert [lengths[i] > 0 for i in leftover] == [True, False, False, False]
    mixed = [b for b in batches_of(order, 4) if not is_pure(b, lengths)]
    assert len(mixed) <= 1


def test_sampler_megabatches_are_shuffled() -> None:
    lengths = signed_lengths(num_images=40, num_texts=40)
    orders = set()
    for epoch in range(4):
        sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, seed=0)
        sampler.set_epoch(epoch)
        kinds = tuple(lengths[b[0]] > 0 for b in batches_of(list(sampler), 4))
        assert sum(kinds) == 10  # all batches pure, modalities interleaved
        orders.add(kinds)
    assert len(orders) > 1


def test_sampler_world_size_two() -> None:
    lengths = signed_lengths(num_images=30, num_texts=25)
    batch_size, world_size = 3, 2
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=batch_size, world_size=world_size, seed=1)
    order = list(sampler)
    full = (30 // 6 + 25 // 6) * 6
    for megabatch in batches_of(order[:full], batch_size * world_size):
        assert is_pure(megabatch, lengths)
        rank_batches = batches_of(megabatch, batch_size)
        totals = []
        for batch in rank_batches:
            sizes = [abs(lengths[i]) for i in batch]
            assert sizes == sorted(sizes, reverse=True)
            totals.append(sum(sizes))
        # Dealt longest-first to the lighter rank: token totals differ by at most one sample.
        assert abs(totals[0] - totals[1]) <= max(abs(lengths[i]) for i in megabatch)
        # The longest sample of the megabatch opens rank 0's batch.
        assert abs(lengths[rank_batches[0][0]]) == max(abs(lengths[i]) for i in megabatch)
    # Sharded the way accelerate does: each step the two ranks draw from the same modality.
    shards = [
        list(BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False), world_size, rank))
        for rank in range(world_size)
    ]
    assert {i for shard in shards for batch in shard for i in batch} == set(range(len(lengths)))
    for step, (a, b) in enumerate(zip(*shards, strict=True)):
        if (step + 1) * batch_size * world_size <= full:
            assert is_pure(a + b, lengths), step


def test_sampler_single_modality_and_errors() -> None:
    lengths = [10, 3, 7, 5, 8]
    order = list(ModalityLengthGroupedSampler(lengths, batch_size=2))
    assert sorted(order) == list(range(5))
    text = [-n for n in lengths]
    assert sorted(ModalityLengthGroupedSampler(text, batch_size=2)) == list(range(5))
    with pytest.raises(ValueError, match="length 0 at indices \\[1\\]"):
        ModalityLengthGroupedSampler([3, 0, -2], batch_size=2)
    with pytest.raises(ValueError, match="batch_size and world_size must be >= 1"):
        ModalityLengthGroupedSampler([3], batch_size=0)


@pytest.mark.parametrize("collator", [PaddedCollator(PAD), PackedCollator()], ids=["padded", "packed"])
def test_sampler_feeds_either_collator(collator, model) -> None:
    pool = [s for seed in range(4) for s in make_samples(model.num_image_tokens, seed=seed)]
    lengths = modality_lengths(
        [len(s["input_ids"]) for s in pool], [s["pixel_values"] is not None for s in pool]
    )
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, seed=0)
    loader = DataLoader(pool, batch_size=4, sampler=sampler, collate_fn=collator)
    seen = 0
    for batch in loader:
        images = int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) // model.num_image_tokens
        assert images == (len(batch["pixel_values"]) if "pixel_values" in batch else 0)
        seen += int((batch["labels"] != -100).sum())
    supervised = sum(int((s["labels"] != -100).sum()) for s in pool)
    assert seen == supervised  # every sample once (the first labels are never supervised here)
