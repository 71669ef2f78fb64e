"""The LM head + loss of one packed training row: transformers' loss vs the chunked loss.

transformers computes the logits of every position of the row, upcasts them to fp32 and keeps
them and their gradient; ``chunked_causal_lm_loss`` (``--loss_chunk_size``) runs the head on
the positions with a target only, a chunk at a time, computing each chunk's gradients at once
(a fused linear cross-entropy in plain PyTorch). Same head, hidden
states and labels (a packed row of mix665k-like samples: masked image tokens and prompts);
the table reports forward+backward time (the variants timed in interleaved rounds), the peak
memory the step allocates on top of its inputs and weights (``torch.cuda.max_memory_allocated``
on CUDA, ``memory.TensorMemory`` elsewhere, each in its own untimed run), and that loss and
gradients agree.

    python benchmarks/loss.py                   # CPU fp32, the 7B head (4096 x 32000), 16 samples
    python benchmarks/loss.py --quick           # seconds (run by the tests)
    python benchmarks/loss.py --device cuda --dtype bfloat16 --batch 64   # on a GPU
"""

from __future__ import annotations

import argparse

import torch
from memory import TensorMemory
from packing import make_samples
from projector import interleaved_medians
from transformers.loss.loss_utils import ForCausalLMLoss

from tokenpacker_llava.data.collate import PackedCollator
from tokenpacker_llava.models.loss import chunked_causal_lm_loss

BASELINE = "transformers (full fp32 logits)"


def variant_name(chunk_size: int) -> str:
    return BASELINE if chunk_size == 0 else f"chunked, {chunk_size} tokens"


def inputs(args: argparse.Namespace) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    samples = make_samples(args.batch, args.tokens_per_image, args.vocab, args.seed, args.max_length)
    labels = PackedCollator()(samples)["labels"].to(args.device)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(args.device, dtype)
    hidden = torch.randn(1, labels.shape[1], args.hidden, device=args.device, dtype=dtype)
    return head, hidden.requires_grad_(), labels


def step(chunk_size: int, head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    head.weight.grad = hidden.grad = None
    if chunk_size == 0:
        loss = ForCausalLMLoss(head(hidden), labels, head.out_features)
    else:
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def peak_bytes(chunk_size: int, head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> int:
    """What one step allocates at most on top of what exists before it."""
    head.weight.grad = hidden.grad = None
    if hidden.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(chunk_size, head, hidden, labels)
        return torch.cuda.max_memory_allocated() - before
    with TensorMemory() as memory:
        step(chunk_size, head, hidden, labels)
    return memory.peak


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16, help="samples packed into the row")
    parser.add_argument("--tokens_per_image", type=int, default=144)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[4096, 2048, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.vocab, args.batch, args.tokens_per_image = 64, 2000, 4, 16
        args.chunk_sizes, args.repeats = [128], 5
    head, hidden, labels = inputs(args)
    variants = [0, *args.chunk_sizes]
    results = {}
    for size in variants:
        loss = step(size, head, hidden, labels)
        results[size] = {
            "loss": loss.item(),
            "grad_hidden": hidden.grad.float(),
            "grad_head": head.weight.grad.float(),
            "peak_mib": peak_bytes(size, head, hidden, labels) / 2**20,
            "tokens": labels.shape[1],
            "targets": int((labels[:, 1:] != -100).sum()),
        }
    runs = {size: (lambda size=size: step(size, head, hidden, labels)) for size in variants}
    for size, seconds in interleaved_medians(runs, args.repeats, args.device).items():
        results[size]["ms"] = 1000 * seconds
    base = results[0]
    print(
        f"LM head + loss fwd+bwd, {args.device} {args.dtype}, hidden {args.hidden}, vocab {args.vocab}, "
        f"a packed row of {args.batch} samples: {base['tokens']} tokens, {base['targets']} with a target "
        f"({base['targets'] / base['tokens']:.0%}), median of {args.repeats}"
    )
    print(f"{'loss':<32} {'ms/iter':>9} {'speedup':>8} {'peak MiB':>9} {'vs base':>8} {'max grad diff':>14}")
    for size, result in results.items():
        difference = max(
            (result["grad_hidden"] - base["grad_hidden"]).abs().max().item(),
            (result["grad_head"] - base["grad_head"]).abs().max().item(),
        )
        print(
            f"{variant_name(size):<32} {result['ms']:>9.1f} {base['ms'] / result['ms']:>7.2f}x "
            f"{result['peak_mib']:>9.0f} {result['peak_mib'] / base['peak_mib']:>8.2f} {difference:>14.1e}"
        )
        result["grad_difference"], result["loss_difference"] = difference, abs(result["loss"] - base["loss"])
    print(f"max |loss difference| {max(r['loss_difference'] for r in results.values()):.1e}")
    return {variant_name(size): result for size, result in results.items()}


if __name__ == "__main__":
    main()
