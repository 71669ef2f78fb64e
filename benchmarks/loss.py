"""The LM head + loss of one packed training row: transformers' loss vs the chunked loss.

transformers computes the logits of every position of the row, upcasts them to fp32 and keeps
them and their gradient; ``chunked_causal_lm_loss`` (``--loss_chunk_size``) runs the head on
the positions with a target only, a chunk at a time, computing each chunk's gradients at once
(a fused linear cross-entropy in plain PyTorch). Same head, hidden
states and labels (a packed row of mix665k-like samples: masked image tokens and prompts);
the table reports forward+backward time, the peak memory the step adds on top of its inputs
and weights, and that loss and gradients agree.

On CPU each variant runs in its own process and its peak is the process's peak resident
memory above what it held before the step; on CUDA it is ``torch.cuda.max_memory_allocated``.

    python benchmarks/loss.py --hidden 1024     # CPU fp32 (LLaMA's 32k vocabulary, 16 samples)
    python benchmarks/loss.py --quick           # seconds (run by the tests)
    python benchmarks/loss.py --device cuda --dtype bfloat16 --batch 64   # H = 4096, on a GPU
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing import make_samples  # noqa: E402

from tokenpacker_llava.data.collate import PackedCollator  # noqa: E402
from tokenpacker_llava.models.loss import chunked_causal_lm_loss  # noqa: E402

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
    if chunk_size == 0:
        loss = ForCausalLMLoss(head(hidden), labels, head.out_features)
    else:
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(chunk_size: int, args: argparse.Namespace) -> dict:
    """Time, peak extra memory, loss and gradients of ``args.repeats`` steps of one variant."""
    head, hidden, labels = inputs(args)
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_bytes()
    times = []
    for _ in range(args.repeats + 1):  # the first run warms up and is not counted
        head.weight.grad = hidden.grad = None
        synchronize(args.device)
        start = time.perf_counter()
        loss = step(chunk_size, head, hidden, labels)
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    if on_cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "ms": 1000 * statistics.median(times[1:]),
        "peak_mib": peak / 2**20,
        "loss": loss.item(),
        "grad_hidden": hidden.grad.float(),
        "grad_head": head.weight.grad.float(),
        "tokens": labels.shape[1],
        "targets": int((labels[:, 1:] != -100).sum()),
    }


def measure_in_subprocess(chunk_size: int, argv: list[str], scratch: Path) -> dict:
    """A fresh process per variant, so one's peak resident memory is not another's."""
    result = scratch / f"chunk{chunk_size}.pt"
    command = [sys.executable, __file__, *argv, "--_variant", str(chunk_size), "--_result", str(result)]
    subprocess.run(command, check=True)
    return torch.load(result, weights_only=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
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
    parser.add_argument("--_variant", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.vocab, args.batch, args.tokens_per_image = 64, 2000, 4, 16
        args.chunk_sizes, args.repeats = [128], 2
    if args._variant is not None:
        torch.save(measure(args._variant, args), args._result)
        return {}
    variants = [0, *args.chunk_sizes]
    if args.device.startswith("cuda"):
        results = {size: measure(size, args) for size in variants}
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            results = {size: measure_in_subprocess(size, argv, Path(scratch)) for size in variants}
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
