"""Vision tower forward throughput: eager vs ``torch.compile`` (``--compile_parts vision_tower``).

The frozen tower runs forward only in both training stages (no gradient), on every image of
every batch: CLIP-L/336 up to its 23rd layer, keeping the query layer and the four multi-level
layers TokenPacker reads (``VisionEncoder``). Same weights and images; the compiled copy is
compiled by its first call, and the two are then timed in interleaved rounds. Reports images/s, the speedup and the largest difference
of the features.

    python benchmarks/vision.py                  # CLIP-L/336, batch 4, CPU fp32
    python benchmarks/vision.py --quick          # a small tower, seconds + compile time (tests)
    python benchmarks/vision.py --device cuda --dtype bfloat16 --batch 64   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from projector import interleaved_medians
from transformers import CLIPVisionConfig

from tokenpacker_llava.models.vision import VisionEncoder, default_multi_level_layers

EAGER = "eager"
COMPILED = "torch.compile"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    if args.quick:
        config = CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=96,
            patch_size=8,
        )
        args.batch, args.repeats = 2, 10
    else:  # CLIP ViT-L/14-336
        config = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layers = default_multi_level_layers(config.num_hidden_layers)
    eager = VisionEncoder(config, feature_layer=-2, multi_level_layers=layers).to(args.device, dtype).eval()
    compiled = copy.deepcopy(eager)
    compiled.compile()  # as --compile_parts vision_tower
    pixels = torch.randn(args.batch, 3, config.image_size, config.image_size, device=args.device, dtype=dtype)
    start = time.perf_counter()
    with torch.no_grad():
        reference, result = eager(pixels), compiled(pixels)
    compile_seconds = time.perf_counter() - start
    difference = max(
        (reference.features - result.features).abs().max().item(),
        (reference.multi_level - result.multi_level).abs().max().item(),
    )
    with torch.no_grad():  # the two towers timed in interleaved rounds
        rows = interleaved_medians(
            {EAGER: lambda: eager(pixels), COMPILED: lambda: compiled(pixels)}, args.repeats, args.device
        )
    print(
        f"vision tower forward, {args.device} {args.dtype}, {config.num_hidden_layers - 1} of "
        f"{config.num_hidden_layers} layers x {config.hidden_size}, {config.image_size} px / "
        f"{config.patch_size}, batch {args.batch}, median of {args.repeats}, torch threads "
        f"{torch.get_num_threads()}; first compiled call (compiling) {compile_seconds:.1f} s"
    )
    print(f"{'tower':<16} {'ms/iter':>9} {'images/s':>9} {'speedup':>8}")
    for name, seconds in rows.items():
        print(
            f"{name:<16} {1000 * seconds:>9.1f} {args.batch / seconds:>9.1f} {rows[EAGER] / seconds:>7.2f}x"
        )
    print(f"max |feature difference| {difference:.2e}")
    return {"rows": rows, "difference": difference, "compile_seconds": compile_seconds}


if __name__ == "__main__":
    main()
