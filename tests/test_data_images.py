"""Image loading: mode conversion, EXIF orientation, pad/resize geometry, processor parity, bad images."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from tokenpacker_llava.data.images import ImagePreprocessor, expand_to_square, to_rgb
from tokenpacker_llava.data.records import BadSample

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48
RED, BLUE = (220, 20, 30), (10, 40, 200)


def clip_processor(size: int = SIZE, crop: int | None = None) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop or size)


def siglip_processor(size: int = SIZE) -> SiglipImageProcessorPil:
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def processor_output(processor, image: Image.Image) -> torch.Tensor:
    return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def normalized(processor, colour: tuple[int, int, int]) -> torch.Tensor:
    """What the processor turns one RGB colour into, shape (3,)."""
    return processor_output(processor, Image.new("RGB", (SIZE, SIZE), colour))[:, 0, 0]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def two_halves(width: int, height: int) -> Image.Image:
    """Left half RED, right half BLUE."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(Image.new("RGB", (width // 2, height), RED), (0, 0))
    return image


def jpeg_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save_kwargs)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return tuple(image.getpixel(xy))


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 2) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --------------------------------------------------------------------------------------------
# to_rgb
# --------------------------------------------------------------------------------------------


def test_rgb_is_returned_as_is() -> None:
    image = Image.new("RGB", (3, 3), RED)
    assert to_rgb(image) is image


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("1", 0, (0, 0, 0)),
        ("YCbCr", (76, 85, 255), (254, 0, 0)),  # pure red in JPEG's YCbCr
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("LAB", (128, 128, 128), (119, 119, 119)),  # its "A" band is a colour axis, not alpha
    ],
)
def test_byte_modes(mode: str, value, expected: tuple[int, int, int]) -> None:
    assert close(pixel(to_rgb(Image.new(mode, (2, 2), value))), expected)


def test_cmyk_cyan_is_cyan() -> None:
    red, green, blue = pixel(to_rgb(Image.new("CMYK", (2, 2), (255, 0, 0, 0))))
    assert red < 40 and green > 200 and blue > 200


def test_palette_with_and_without_transparency() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, *RED] + [0] * (3 * 254))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    assert pixel(to_rgb(image), (0, 0)) == (0, 0, 0)
    assert pixel(to_rgb(image), (1, 0)) == RED
    image.info["transparency"] = 0  # index 0 is transparent: white, not black
    assert pixel(to_rgb(image), (0, 0)) == (255, 255, 255)
    assert pixel(to_rgb(image), (1, 0)) == RED


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_transparent_pixels_become_white(mode: str) -> None:
    # Black pixels with alpha 0, 255 and 128 (built directly: PIL's conversions to PA and La drop alpha).
    colour = {"RGBA": [0, 0, 0], "RGBa": [0, 0, 0], "LA": [0], "La": [0], "PA": [0]}[mode]
    image = Image.frombytes(mode, (3, 1), bytes([*colour, 0, *colour, 255, *colour, 128]))
    if mode == "PA":
        image.putpalette([0, 0, 0] * 256)
    converted = to_rgb(image)
    assert pixel(converted, (0, 0)) == (255, 255, 255)
    assert pixel(converted, (1, 0)) == (0, 0, 0)
    assert close(pixel(converted, (2, 0)), (127, 127, 127))


def test_rgb_colour_key_transparency() -> None:
    image = Image.new("RGB", (2, 1), (0, 0, 0))
    image.putpixel((1, 0), RED)
    image.info["transparency"] = (0, 0, 0)
    assert pixel(to_rgb(image), (0, 0)) == (255, 255, 255)
    assert pixel(to_rgb(image), (1, 0)) == RED


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_scales_from_full_range(mode: str) -> None:
    values = np.array([[0, 32768, 65535]], dtype=">u2" if mode.endswith("B") else "<u2")
    image = Image.frombytes(mode, (3, 1), values.tobytes())
    assert image.mode == mode
    converted = to_rgb(image)
    assert [pixel(converted, (x, 0))[0] for x in range(3)] == [0, 128, 255]  # mid-grey stays mid-grey


def test_16_bit_png_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16)).save(path)
    assert close(pixel(ImagePreprocessor(clip_processor()).open(str(path))), (117, 117, 117), 1)


def test_16_bit_colour_key_transparency() -> None:
    image = Image.frombytes("I;16", (2, 1), np.array([[7, 40000]], dtype="<u2").tobytes())
    image.info["transparency"] = 7
    converted = to_rgb(image)
    assert pixel(converted, (0, 0)) == (255, 255, 255)
    assert pixel(converted, (1, 0)) == (156, 156, 156)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I", [0, 100, 255], [0, 100, 255]),  # byte range: taken as is
        ("I", [0, 32768, 65535], [0, 128, 255]),  # 16-bit range
        ("I", [-100, 0, 155], [0, 100, 255]),  # anything else: stretched min..max
        ("I", [70000, 70000, 70000], [0, 0, 0]),  # constant and out of range: no division by zero
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] floats
        ("F", [0.0, 100.0, 200.0], [0, 100, 200]),
        ("F", [float("nan"), 0.5, 1.0], [0, 128, 255]),  # NaN counts as 0
    ],
)
def test_wide_modes_rescale_by_value_range(mode: str, values: list, expected: list[int]) -> None:
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    converted = to_rgb(image)
    assert [pixel(converted, (x, 0))[0] for x in range(3)] == expected


def test_expand_to_square_centres_on_background() -> None:
    square = expand_to_square(Image.new("RGB", (10, 4), RED), (1, 2, 3))
    assert square.size == (10, 10)
    assert pixel(square, (5, 0)) == (1, 2, 3) and pixel(square, (5, 9)) == (1, 2, 3)
    assert pixel(square, (5, 3)) == RED and pixel(square, (5, 6)) == RED  # rows 3..6


# --------------------------------------------------------------------------------------------
# ImagePreprocessor: geometry and values
# --------------------------------------------------------------------------------------------


def test_properties() -> None:
    clip = ImagePreprocessor(clip_processor(64, crop=56))
    assert clip.size == (56, 56)
    assert clip.background == (122, 116, 104)  # int(mean * 255), as LLaVA-1.5 computes it
    siglip = ImagePreprocessor(siglip_processor(40))
    assert siglip.size == (40, 40)
    assert siglip.background == (127, 127, 127)


def test_unknown_aspect_ratios() -> None:
    with pytest.raises(ValueError, match="'pad', 'resize'"):
        ImagePreprocessor(clip_processor(), aspect_ratio="crop")
    with pytest.raises(ValueError, match="slice.*not handled"):
        ImagePreprocessor(clip_processor(), aspect_ratio="slice")


@pytest.mark.parametrize("aspect_ratio", ["pad", "resize"])
@pytest.mark.parametrize("make", [clip_processor, siglip_processor])
@pytest.mark.parametrize("side", [SIZE, 80])
def test_square_image_matches_the_processor(aspect_ratio: str, make, side: int) -> None:
    processor = make()
    image = random_image(side, side)
    output = ImagePreprocessor(processor, aspect_ratio=aspect_ratio).preprocess(image)
    assert output.shape == (3, SIZE, SIZE) and output.dtype == torch.float32
    torch.testing.assert_close(output, processor_output(processor, image), atol=1e-5, rtol=0)


def test_square_image_matches_a_cropping_processor() -> None:
    processor = clip_processor(64, crop=56)
    image = random_image(90, 90)
    output = ImagePreprocessor(processor).preprocess(image)
    assert output.shape == (3, 56, 56)
    torch.testing.assert_close(output, processor_output(processor, image), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("width", "height"), [(96, 48), (48, 96)])
def test_pad_borders_are_the_mean_colour_around_centred_content(width: int, height: int) -> None:
    processor = clip_processor()
    preprocessor = ImagePreprocessor(processor)
    output = preprocessor.preprocess(Image.new("RGB", (width, height), RED))
    if height > width:
        output = output.transpose(1, 2)  # the bands are then rows either way
    background, red = normalized(processor, preprocessor.background), normalized(processor, RED)
    # The content becomes 48 x 24, pasted between two 12-pixel bands of the mean colour.
    for rows, colour in ((slice(0, 12), background), (slice(12, 36), red), (slice(36, 48), background)):
        region = output[:, rows]
        torch.testing.assert_close(region, colour[:, None, None].expand_as(region), atol=1e-6, rtol=0)


def test_pad_is_close_to_llava_pad_then_resize() -> None:
    processor = clip_processor()
    preprocessor = ImagePreprocessor(processor)
    image = two_halves(120, 72)
    llava = processor_output(processor, expand_to_square(image, preprocessor.background))
    difference = (preprocessor.preprocess(image) - llava).abs()
    assert difference.mean() < 0.05  # they differ only where the resampling filter crosses an edge


def test_resize_fills_the_output_ignoring_aspect_ratio() -> None:
    processor = clip_processor()
    output = ImagePreprocessor(processor, aspect_ratio="resize").preprocess(two_halves(150, 40))
    assert output.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(
        output[:, :, :20], normalized(processor, RED)[:, None, None].expand(3, SIZE, 20)
    )
    torch.testing.assert_close(
        output[:, :, 28:], normalized(processor, BLUE)[:, None, None].expand(3, SIZE, 20)
    )


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "rotated.jpg").write_bytes(jpeg_bytes(two_halves(40, 20), exif=exif))
    preprocessor = ImagePreprocessor(clip_processor(), image_folder=tmp_path)
    image = preprocessor.open("rotated.jpg")
    assert image.size == (20, 40)
    # 6: rotate 90 degrees clockwise for display, so the left (red) half ends on top; 8: at the bottom.
    top, bottom = pixel(image, (10, 5)), pixel(image, (10, 34))
    assert close(top if orientation == 6 else bottom, RED, 12)
    assert close(bottom if orientation == 6 else top, BLUE, 12)


def test_large_jpeg_is_drafted_but_still_matches(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(two_halves(400, 300)))
    preprocessor = ImagePreprocessor(clip_processor(), image_folder=tmp_path)
    assert preprocessor.open("big.jpg").size == (400, 300)
    drafted = preprocessor.open("big.jpg", draft=True)
    assert drafted.size == (50, 38)  # 1/8 scale: still at least the 48 x 36 the pad path resizes it to
    full = preprocessor.preprocess(preprocessor.open("big.jpg"))
    fast = preprocessor("big.jpg")
    assert fast.shape == (3, SIZE, SIZE)
    assert (fast - full).abs().mean() < 0.05


def test_draft_respects_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "tall.jpg").write_bytes(jpeg_bytes(two_halves(400, 100), exif=exif))
    preprocessor = ImagePreprocessor(clip_processor(), aspect_ratio="resize", image_folder=tmp_path)
    # Displayed 100 x 400; "resize" needs 48 x 48, so the stored 400 x 100 decodes at 1/2 (200 x 50).
    assert preprocessor.open("tall.jpg", draft=True).size == (50, 200)
    assert preprocessor("tall.jpg").shape == (3, SIZE, SIZE)


def test_processor_parameters_are_read_from_any_variant() -> None:
    """Plain-dict sizes (older processors) and torchvision-style resample names work too."""

    class InterpolationMode:  # stands in for torchvision's enum, which is not installed here
        value = "bilinear"

    reference = CLIPImageProcessorPil(size={"height": 40, "width": 40}, do_center_crop=False, resample=2)
    processor = SimpleNamespace(
        size={"height": 40, "width": 40},
        do_center_crop=False,
        resample=InterpolationMode(),
        rescale_factor=reference.rescale_factor,
        image_mean=list(reference.image_mean),
        image_std=list(reference.image_std),
    )
    image = random_image(70, 70)
    output = ImagePreprocessor(processor).preprocess(image)
    torch.testing.assert_close(output, processor_output(reference, image), atol=1e-5, rtol=0)


def test_preprocessor_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    Image.new("RGB", (30, 20), RED).save(tmp_path / "a.png")
    preprocessor = ImagePreprocessor(clip_processor(), image_folder=tmp_path)
    clone = pickle.loads(pickle.dumps(preprocessor))
    torch.testing.assert_close(clone("a.png"), preprocessor("a.png"), atol=0, rtol=0)


def test_preprocess_accepts_any_mode() -> None:
    output = ImagePreprocessor(clip_processor()).preprocess(Image.new("LA", (30, 20), (0, 0)))
    white = normalized(clip_processor(), (255, 255, 255))
    torch.testing.assert_close(output[:, 24, 24], white)


# --------------------------------------------------------------------------------------------
# Bad images and paths
# --------------------------------------------------------------------------------------------


def bad_kind(preprocessor: ImagePreprocessor, path: str) -> BadSample:
    with pytest.raises(BadSample) as raised:
        preprocessor(path)
    assert path in str(raised.value)
    return raised.value


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), RED).save(images / "ok.png")
    return images


def test_missing_and_directory(folder: Path) -> None:
    preprocessor = ImagePreprocessor(clip_processor(), image_folder=folder)
    assert bad_kind(preprocessor, "nope.jpg").kind == "missing_image"
    (folder / "sub").mkdir()
    assert bad_kind(preprocessor, "sub").kind == "missing_image"


def test_empty_file(folder: Path) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    assert (
        bad_kind(ImagePreprocessor(clip_processor(), image_folder=folder), "empty.jpg").kind == "empty_image"
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.jpg", os.urandom(1000)),
        ("text.png", b"this is not an image\n" * 10),
        ("truncated.jpg", jpeg_bytes(random_image(200, 150))[:3000]),
        ("truncated_big.jpg", jpeg_bytes(random_image(400, 300))[:20000]),  # decoded with draft
        ("truncated.png", png_bytes(random_image(64, 64))[:6000]),
    ],
)
def test_corrupt_images(folder: Path, name: str, content: bytes) -> None:
    (folder / name).write_bytes(content)
    preprocessor = ImagePreprocessor(clip_processor(), image_folder=folder)
    assert bad_kind(preprocessor, name).kind == "corrupt_image"
    with pytest.raises(BadSample, match="corrupt_image"):
        preprocessor.open(name)  # without draft too


def test_decompression_bomb_is_corrupt(folder: Path) -> None:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 400 Mpixel RGB, far above PIL's limit
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    (folder / "bomb.png").write_bytes(png)
    error = bad_kind(ImagePreprocessor(clip_processor(), image_folder=folder), "bomb.png")
    assert error.kind == "corrupt_image" and "DecompressionBombError" in str(error)


def test_paths_may_not_leave_the_image_folder(folder: Path) -> None:
    secret = folder.parent / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    preprocessor = ImagePreprocessor(clip_processor(), image_folder=folder)
    assert bad_kind(preprocessor, "../secret.png").kind == "image_outside_folder"
    assert bad_kind(preprocessor, "sub/../../secret.png").kind == "image_outside_folder"
    assert bad_kind(preprocessor, str(secret)).kind == "image_outside_folder"
    # Symlinks placed inside the folder are the owner's choice (e.g. `coco -> /data/coco`): followed.
    (folder / "link.png").symlink_to(secret)
    assert preprocessor("link.png").shape == (3, SIZE, SIZE)
    (folder / "linked_dir").symlink_to(folder.parent, target_is_directory=True)
    assert preprocessor("linked_dir/secret.png").shape == (3, SIZE, SIZE)
    assert bad_kind(preprocessor, "linked_dir/../../secret.png").kind == "image_outside_folder"
    # Inside the folder is fine, however it is spelled.
    assert preprocessor.resolve("sub/../ok.png") == folder.absolute() / "ok.png"
    assert preprocessor(str(folder / "ok.png")).shape == (3, SIZE, SIZE)
    (folder / "inner_link.png").symlink_to(folder / "ok.png")
    assert preprocessor("inner_link.png").shape == (3, SIZE, SIZE)


def test_without_image_folder_paths_are_taken_as_given(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preprocessor = ImagePreprocessor(clip_processor())
    monkeypatch.chdir(folder.parent)
    assert preprocessor.resolve("images/ok.png") == Path("images/ok.png")
    assert preprocessor("images/ok.png").shape == (3, SIZE, SIZE)
    assert preprocessor(str(folder / "ok.png")).shape == (3, SIZE, SIZE)


def test_relative_image_folder_is_fixed_at_construction(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(folder.parent)
    preprocessor = ImagePreprocessor(clip_processor(), image_folder="images")
    monkeypatch.chdir(ROOT)
    assert preprocessor("ok.png").shape == (3, SIZE, SIZE)


# --------------------------------------------------------------------------------------------
# The benchmark script stays runnable
# --------------------------------------------------------------------------------------------


def test_benchmark_quick(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location(
        "data_loading_benchmark", ROOT / "benchmarks" / "data_loading.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--num_images", "4", "--size", "320x240"])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "speedup" in printed and "max abs" in printed
    assert all(rate > 0 for rate in result["images_per_second"].values())
    assert result["max_abs_diff"] < 1.0
