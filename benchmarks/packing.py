"""Training-step throughput: padding-free packing vs LLaVA-style right padding.

Same model, same initial weights, same optimizer, and the same batches (formed by LLaVA's
length-and-modality grouped sampler over a mix665k-like length distribution: about a third
text-only, long-tailed lengths); only the layout and the attention backend differ: padded
batches with SDPA (the baseline), a packed row with SDPA and its dense block-diagonal mask,
and a packed row with ``sdpa_varlen`` (one causal SDPA call per sample; what training uses
without flash-attn). Reports real (non-pad) tokens/s,
the share of computed positions that are padding, per-step loss agreement, and peak GPU
memory when run on CUDA.

    python benchmarks/packing.py            # tiny model on CPU
    python benchmarks/packing.py --quick    # seconds (run by the tests)
    python benchmarks/packing.py --device cuda --hidden 1024 --layers 8 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.data.collate import PackedCollator, PaddedCollator
from tokenpacker_llava.data.sampler import ModalityLengthGroupedSampler

VOCAB = 1000
IMAGE_TOKEN = VOCAB  # outside the table: placeholders are never looked up
BASELINE = "padded + grouped (LLaVA), sdpa"
PACKED = "packed, sdpa_varlen (default)"


def build_model(hidden: int, layers: int, vocab: int, seed: int) -> TokenPackerLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=48,
        patch_size=4,
    )
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    config = TokenPackerLlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    return TokenPackerLlavaForConditionalGeneration(config)


def make_samples(count: int, tokens_per_image: int, vocab: int, seed: int, max_length: int) -> list[dict]:
    """A mix665k-like mixture: ~1/3 text-only; long-tailed conversation lengths.

    Each sample is cut to ``max_length`` after it is drawn (as the data pipeline truncates to
    ``model_max_length``), so the draws depend on the seed only: every ``tokens_per_image``
    gets the same conversations. The image placeholders sit at positions 4.., so only text is cut.
    """
    if max_length < tokens_per_image + 8:
        raise ValueError(
            f"max_length {max_length} leaves no room for text next to {tokens_per_image} visual tokens"
        )
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        text_length = int(max(8, rng.lognormvariate(math.log(110), 0.8)))
        has_image = rng.random() > 0.33
        ids = [rng.randrange(1, vocab) for _ in range(text_length)]
        if has_image:
            ids = ids[:4] + [IMAGE_TOKEN] * tokens_per_image + ids[4:]
        labels = [-100 if i == IMAGE_TOKEN else i for i in ids]
        labels[: len(labels) // 2] = [-100] * (len(labels) // 2)  # the prompt half is not supervised
        samples.append(
            {
                "input_ids": torch.tensor(ids[:max_length]),
                "labels": torch.tensor(labels[:max_length]),
                "pixel_values": torch.randn(
                    1, 3, 48, 48, generator=torch.Generator().manual_seed(len(samples))
                )
                if has_image
                else None,
            }
        )
    return samples


def run(model, batches, collate, device: str) -> tuple[float, int, int, list[float], float]:
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = computed = 0
    losses = []
    start = None
    for step, samples in enumerate(batches):
        if step == 1:  # the first step warms up and is not timed
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = collate(samples)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= 1:
            real += sum(len(s["input_ids"]) for s in samples)
            computed += batch["input_ids"].numel()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return seconds, real, computed, losses, peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--group_world_size",
        type=int,
        default=8,
        help="ranks LLaVA's grouping spans (megabatch = batch x this)",
    )
    args = parser.parse_args(argv)
    steps, hidden, layers = (3, 64, 1) if args.quick else (args.steps, args.hidden, args.layers)
    steps = max(steps, 2)
    vocab = VOCAB
    model = build_model(hidden, layers, vocab, seed=0)
    # Whole megabatches, so LLaVA's grouping sorts as it would on `group_world_size` GPUs.
    count = math.ceil(steps / args.group_world_size) * args.group_world_size * args.batch
    samples = make_samples(count, model.num_image_tokens, vocab, seed=0, max_length=1024)
    lengths = [len(s["input_ids"]) * (1 if s["pixel_values"] is not None else -1) for s in samples]
    sampler = ModalityLengthGroupedSampler(
        lengths, batch_size=args.batch, world_size=args.group_world_size, seed=0
    )
    order = list(sampler)[: steps * args.batch]
    batches = [[samples[i] for i in order[k : k + args.batch]] for k in range(0, len(order), args.batch)]
    results = {}
    for name, collate, attention in (
        (BASELINE, PaddedCollator(pad_token_id=0), "sdpa"),
        ("packed, sdpa (block mask)", PackedCollator(), "sdpa"),
        (PACKED, PackedCollator(), "sdpa_varlen"),
    ):
        candidate = copy.deepcopy(model)
        candidate.set_attn_implementation(attention)
        results[name] = run(candidate, batches, collate, args.device)
    base_seconds, base_real = results[BASELINE][:2]
    print(
        f"training steps, {args.device}, LLM hidden {hidden} x {layers} layers, batch {args.batch} samples, "
        f"{len(batches) - 1} timed steps, {model.num_image_tokens} visual tokens/image, batches grouped as on "
        f"{args.group_world_size} ranks, torch threads {torch.get_num_threads()}"
    )
    print(f"{'layout, attention':<34} {'tokens/s':>10} {'padding':>8} {'speedup':>8} {'peak GiB':>9}")
    for name, (seconds, real, computed, _, peak) in results.items():
        speedup = (real / seconds) / (base_real / base_seconds)
        print(f"{name:<34} {real / seconds:>10.0f} {1 - real / computed:>7.1%} {speedup:>7.2f}x {peak:>9.2f}")
    padded_losses = results[BASELINE][3]
    difference = max(
        abs(a - b) for name, result in results.items() for a, b in zip(padded_losses, result[3], strict=True)
    )
    print(f"max per-step loss difference to the baseline: {difference:.2e} over {len(padded_losses)} steps")
    return {"results": results, "loss_difference": difference}


if __name__ == "__main__":
    main()
