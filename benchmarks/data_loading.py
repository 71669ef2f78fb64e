"""Image loading speed: LLaVA-1.5's image path against ``ImagePreprocessor`` ("pad"), one process.

    python benchmarks/data_loading.py [--quick] [--num_images N] [--size WxH] [--repeats R]

Generates photo-like JPEGs (smooth gradients, shapes and sensor-like noise, quality 90, so decoding
costs what real photos cost; by default a mix of 640x480, 480x640 and 1024x768) in a temporary
folder, then times, on the same images in the same order and interleaved image by image:

* ``llava-1.5``: ``Image.open(path).convert("RGB")``, ``expand2square`` with the mean colour at full
  resolution, then ``CLIPImageProcessor.preprocess(image, return_tensors="pt")`` (the PIL
  processor, 336 px: shortest edge 336, crop 336), as in LLaVA-1.5's ``LazySupervisedDataset``;
* ``ImagePreprocessor``: the same processor, ``aspect_ratio="pad"``.

A warm-up pass is excluded. It prints images/s, ms/image and the speedup, and the largest absolute
difference between the two outputs on a few images: they differ slightly because this package resizes
before padding (and JPEGs much larger than the target are decoded at a reduced scale).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenpacker_llava.data.images import ImagePreprocessor  # noqa: E402

DEFAULT_SIZES = ((640, 480), (640, 480), (480, 640), (1024, 768))
DIFF_IMAGES = 4  # images whose outputs are compared


def clip_processor_336():
    """The slow (PIL) CLIP processor at LLaVA-1.5's 336 px settings."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class  # transformers >= 5
    except ImportError:  # transformers 4.x: the default class is the PIL one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Verbatim from LLaVA-1.5 (llava/train/train.py)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def llava_loader(processor, folder: Path) -> Callable[[str], torch.Tensor]:
    background = tuple(int(x * 255) for x in processor.image_mean)

    def load(name: str) -> torch.Tensor:
        image = Image.open(folder / name).convert("RGB")
        image = expand2square(image, background)
        return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]

    return load


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour gradients, a few soft shapes and noise: JPEG-decodes like a real photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * x / width + fy * y / height) + phase)
        channels.append(128 + 70 * wave + rng.uniform(-30, 30))
    pixels = np.stack(channels, axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_images(
    folder: Path, num_images: int, sizes: tuple[tuple[int, int], ...], seed: int = 0
) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for index in range(num_images):
        width, height = sizes[index % len(sizes)]
        name = f"{index:05d}_{width}x{height}.jpg"
        photo_like(width, height, rng).save(folder / name, quality=90)
        names.append(name)
    return names


def time_side_by_side(
    loaders: dict[str, Callable[[str], torch.Tensor]], names: list[str], repeats: int
) -> dict[str, float]:
    """Total seconds per loader; each image goes through every loader before the next image."""
    for name in names[:2]:  # warm-up: imports, allocator, file cache
        for load in loaders.values():
            load(name)
    totals = dict.fromkeys(loaders, 0.0)
    for _ in range(repeats):
        for name in names:
            for label, load in loaders.items():
                start = time.perf_counter()
                load(name)
                totals[label] += time.perf_counter() - start
    return totals


def output_differences(
    reference: Callable[[str], torch.Tensor], candidate: Callable[[str], torch.Tensor], names: list[str]
) -> list[tuple[str, float, float]]:
    rows = []
    for name in names[:DIFF_IMAGES]:
        expected, actual = reference(name), candidate(name)
        if expected.shape != actual.shape:
            raise AssertionError(f"{name}: shapes differ, {tuple(expected.shape)} vs {tuple(actual.shape)}")
        difference = (expected - actual).abs()
        rows.append((name, difference.max().item(), difference.mean().item()))
    return rows


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 640x480, got {text!r}") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return width, height


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, one pass (a smoke test)")
    parser.add_argument(
        "--num_images", type=int, default=None, help="images to generate (default 200, quick 8)"
    )
    parser.add_argument("--size", type=parse_size, default=None, help="WxH of every image (default: a mix)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed passes over the images (default 2, quick 1)"
    )
    args = parser.parse_args(argv)
    args.num_images = args.num_images or (8 if args.quick else 200)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.num_images < 1 or args.repeats < 1:
        parser.error("--num_images and --repeats must be at least 1")
    return args


def print_table(totals: dict[str, float], processed: int, baseline: str) -> None:
    print(f"{'path':<34} {'images/s':>10} {'ms/image':>10} {'speedup':>8}")
    for label, seconds in totals.items():
        speedup = totals[baseline] / seconds
        print(
            f"{label:<34} {processed / seconds:>10.1f} {1000 * seconds / processed:>10.2f} {speedup:>7.2f}x"
        )


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    sizes = (args.size,) if args.size else DEFAULT_SIZES
    processor = clip_processor_336()
    with tempfile.TemporaryDirectory(prefix="tokenpacker_bench_") as tmp:
        folder = Path(tmp)
        names = make_images(folder, args.num_images, sizes)
        baseline = "llava-1.5 (expand2square+processor)"
        loaders = {
            baseline: llava_loader(processor, folder),
            'ImagePreprocessor("pad")': ImagePreprocessor(processor, aspect_ratio="pad", image_folder=folder),
        }
        totals = time_side_by_side(loaders, names, args.repeats)
        differences = output_differences(*loaders.values(), names)

    processed = len(names) * args.repeats
    size_text = ", ".join(sorted({f"{w}x{h}" for w, h in sizes}))
    print(
        f"{len(names)} JPEGs ({size_text}), {args.repeats} timed pass(es), 336 px CLIP processor, "
        f"single process, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    print_table(totals, processed, baseline)
    print("output difference, llava-1.5 vs ImagePreprocessor (normalized units):")
    for name, largest, mean in differences:
        print(f"  {name:<24} max abs {largest:.4f}  mean abs {mean:.5f}")
    return {
        "images_per_second": {label: processed / seconds for label, seconds in totals.items()},
        "max_abs_diff": max(largest for _, largest, _ in differences),
    }


if __name__ == "__main__":
    main()
