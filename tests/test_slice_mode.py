"""Slice mode (TokenPacker-HD) end to end: every sample gets exactly its own tiles in padded and
packed batches, generation with a cache equals a stepwise decode, training through the entry
point, inference on the trained folder, and converted reference HD checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_text_config, tiny_vision_config
from PIL import Image
from test_convert import VOCAB, write_clip, write_reference_folder
from test_model import greedy_without_cache
from training_util import losses, make_parts, stage2_args
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig

from tokenpacker_llava import TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.cli import main as cli_main
from tokenpacker_llava.data.collate import PackedCollator, PaddedCollator
from tokenpacker_llava.data.dataset import SampleBuilder
from tokenpacker_llava.data.records import Turn, parse_record
from tokenpacker_llava.data.slicing import slice_layout
from tokenpacker_llava.data.templates import get_template
from tokenpacker_llava.data.tokenize import tokenize_prompt
from tokenpacker_llava.data.visual_inputs import ImageLoader, ImageMode
from tokenpacker_llava.inference.answer import answer_questions, load_questions, read_answers
from tokenpacker_llava.inference.generation import GenerationSettings
from tokenpacker_llava.inference.loading import load_model
from tokenpacker_llava.tokenization import ensure_image_token, slice_separator_ids, train_llama_tokenizer
from tokenpacker_llava.train import run
from tokenpacker_llava.training.arguments import parse_arguments, validate

TILE = 336  # a tiny CLIP at the published input size: 24 x 24 patches, 144 tokens per view at s=2
# Square images whose 1.4x box is exactly the 1 x 1, 2 x 2 and 3 x 3 canvas.
SIDES = {1: 240, 4: 480, 9: 720}


@pytest.fixture(scope="module")
def hd(tmp_path_factory, llama_tokenizer_dir: Path) -> dict:
    """A tiny slice-mode model at 336 px, its tokenizer, and noise images with 1, 4 and 9 tiles."""
    root = tmp_path_factory.mktemp("hd")
    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    image_token_id = ensure_image_token(tokenizer)
    separators = slice_separator_ids(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=14,
    )
    config = TokenPackerLlavaConfig(
        vision_config=vision,
        text_config=tiny_text_config("llama", vocab_size=VOCAB),
        projector_type="tokenpacker",
        scale_factor=2,
        image_token_id=image_token_id,
        image_aspect_ratio="slice",
        patch_num=9,
        slice_separator_ids=list(separators),
    )
    torch.manual_seed(0)
    model = TokenPackerLlavaForConditionalGeneration(config).eval()
    images = root / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for tiles, side in SIDES.items():
        noise = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(noise.numpy()).save(images / f"tiles{tiles}.png")
    processor = CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size=TILE)
    return {
        "model": model,
        "tokenizer": tokenizer,
        "image_token_id": image_token_id,
        "separators": separators,
        "images": images,
        "processor": processor,
    }


def record(row: int, images: list[str], question: str = "What is this?") -> dict:
    placeholders = "".join("<image>\n" for _ in images)
    return {
        "id": f"r{row}",
        "image": images,
        "conversations": [
            {"from": "human", "value": placeholders + question},
            {"from": "gpt", "value": "noise"},
        ],
    }


def samples(hd: dict) -> list[dict]:
    builder = SampleBuilder(
        hd["tokenizer"],
        get_template("vicuna_v1", hd["tokenizer"]),
        image_token_id=hd["image_token_id"],
        tokens_per_image=hd["model"].config.num_image_tokens,
        max_length=None,
        image_processor=hd["processor"],
        image_aspect_ratio="slice",
        patch_num=9,
        separator_ids=hd["separators"],
    )
    rows = [["tiles1.png"], ["tiles4.png"], ["tiles9.png", "tiles1.png"]]
    return [
        builder.build(parse_record(record(row, images), row=row, source="test"), str(hd["images"]))
        for row, images in enumerate(rows)
    ]


def check_own_features(model, input_ids: torch.Tensor, embeds: torch.Tensor, sample: dict) -> None:
    """The placeholders hold the projected features of this sample's own views, in order, and the
    separators the embedding rows of their token ids."""
    image_id = model.config.image_token_id
    comma, newline = model.config.slice_separator_ids
    with torch.no_grad():
        own = model.get_image_features(sample["pixel_values"]).reshape(-1, embeds.shape[-1])
    torch.testing.assert_close(embeds[input_ids == image_id], own, rtol=1e-5, atol=1e-5)
    table = model.get_input_embeddings().weight
    for separator in (comma, newline):
        positions = input_ids == separator
        assert positions.any()
        torch.testing.assert_close(embeds[positions], table[separator].expand(int(positions.sum()), -1))


def test_every_sample_gets_its_own_tiles_in_padded_and_packed_batches(hd) -> None:
    model = hd["model"]
    batch_samples = samples(hd)
    views = [sample["pixel_values"].shape[0] for sample in batch_samples]
    assert views == [1, 5, 10 + 1]  # 1 tile; 4 tiles + global; 9 tiles + global, then 1 tile
    # The expected token counts: 145 for one tile, 4*144 + 2 + 2 + 145 for 2 x 2, 1450 for 3 x 3.
    image_id = hd["image_token_id"]
    comma, newline = hd["separators"]
    layout_3x3 = slice_layout(
        3, 3, image_token_id=image_id, tokens_per_view=144, separator_ids=(comma, newline)
    )
    assert len(layout_3x3) == 1450
    ids = batch_samples[2]["input_ids"].tolist()
    start = ids.index(image_id)
    assert ids[start : start + 1450] == layout_3x3
    assert [sum(1 for token in s["input_ids"].tolist() if token == image_id) for s in batch_samples] == [
        144 * v for v in views
    ]
    # Views of different images and samples really differ, so a mix-up could not go unnoticed.
    with torch.no_grad():
        first = model.get_image_features(batch_samples[1]["pixel_values"][:2])
    assert (first[0] - first[1]).abs().max() > 1e-3

    padded = PaddedCollator(hd["tokenizer"].pad_token_id or 0)(batch_samples)
    with torch.no_grad():
        embeds = model.embed_inputs(padded["input_ids"], padded["pixel_values"])
    for row, sample in enumerate(batch_samples):
        length = len(sample["input_ids"])
        check_own_features(model, padded["input_ids"][row, :length], embeds[row, :length], sample)

    packed = PackedCollator()(batch_samples)
    with torch.no_grad():
        embeds = model.embed_inputs(packed["input_ids"], packed["pixel_values"])[0]
    start = 0
    for sample in batch_samples:
        stop = start + len(sample["input_ids"])
        check_own_features(model, packed["input_ids"][0, start:stop], embeds[start:stop], sample)
        start = stop
    # Both layouts give the same loss.
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_stepwise_decode_in_slice_mode(hd) -> None:
    model, tokenizer = hd["model"], hd["tokenizer"]
    mode = ImageMode.from_config(model.config)
    loader = ImageLoader(hd["processor"], mode, image_folder=hd["images"])
    template = get_template("vicuna_v1", tokenizer)
    prompts, pixels = [], []
    for names in (["tiles4.png"], ["tiles1.png"], ["tiles1.png", "tiles4.png"]):
        visuals = [loader(name) for name in names]
        turns = [Turn("user", "<image>\n" * len(names) + "Describe.")]
        prompts.append(
            tokenize_prompt(
                turns,
                template,
                tokenizer,
                image_token_id=mode.image_token_id,
                image_expansions=[v.token_ids for v in visuals],
            )
        )
        pixels += [v.pixel_values for v in visuals]
    width = max(map(len, prompts))
    batch = {
        "input_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
        "pixel_values": torch.cat(pixels),
    }
    model.generation_config.eos_token_id = None  # run all steps
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
        expected = greedy_without_cache(model, batch, steps=6)
    assert torch.equal(generated, expected)


# --------------------------------------------------------------------------------------------
# Training and inference through the real entry points
# --------------------------------------------------------------------------------------------


def test_slice_options_are_validated_before_anything_loads(tmp_path) -> None:
    parts = {name: tmp_path for name in ("llm", "vision", "images")}
    parts["instructions"] = tmp_path / "missing.json"
    args = stage2_args(parts, tmp_path / "out", None, "--image_aspect_ratio", "slice", "--patch_num", "12")
    with pytest.raises(ValueError, match="--patch_num 12: choose from \\(9, 16, 25\\)"):
        validate(*parse_arguments(args))
    args = stage2_args(parts, tmp_path / "out", None, "--image_aspect_ratio", "tiles")
    with pytest.raises(ValueError, match="--image_aspect_ratio 'tiles'"):
        validate(*parse_arguments(args))


def test_slice_training_end_to_end_then_inference(tmp_path) -> None:
    parts = make_parts(tmp_path / "parts")
    # Images of several sizes so that a batch mixes grids (48 px tiles on the tiny tower).
    for index, size in enumerate([(48, 48), (96, 96), (150, 140), (40, 150)]):
        Image.new("RGB", size, (40 * index, 200, 30)).save(parts["images"] / f"{index:03d}.png")
    output = tmp_path / "stage2"
    extra = ("--image_aspect_ratio", "slice", "--patch_num", "9", "--packing", "True", "--max_steps", "2",
             "--model_max_length", "512", "--save_strategy", "no")  # fmt: skip
    model_args, data_args, training_args = parse_arguments(stage2_args(parts, output, None, *extra))
    validate(model_args, data_args, training_args)  # what `python -m tokenpacker_llava.train` runs
    trainer = run(model_args, data_args, training_args)
    assert len(losses(trainer)) == 2 and all(torch.isfinite(torch.tensor(losses(trainer))))
    config = json.loads((output / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert config["image_aspect_ratio"] == "slice" and config["patch_num"] == 9
    assert config["slice_separator_ids"] == list(slice_separator_ids(tokenizer))

    # Inference reads slice mode from the config: batched answers equal one-at-a-time answers.
    loaded = load_model(output)
    assert loaded.image_mode.slicing and loaded.image_mode.separator_ids == tuple(
        config["slice_separator_ids"]
    )
    rows = [{"question_id": i, "image": f"{i:03d}.png", "text": "What colour?"} for i in range(4)]
    questions_file = tmp_path / "questions.jsonl"
    questions_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = GenerationSettings(max_new_tokens=4)
    answers = {}
    for batch_size in (1, 4):
        out = tmp_path / f"answers{batch_size}.jsonl"
        answer_questions(loaded, load_questions(questions_file), out, image_folder=parts["images"],
                         settings=settings, batch_size=batch_size)  # fmt: skip
        answers[batch_size] = [answer["text"] for answer in read_answers(out)]
    assert answers[1] == answers[4]
    grids = {loaded.images(parts["images"])(f"{i:03d}.png").plan.num_tiles for i in range(4)}
    assert len(grids) > 1  # the batch really mixed tile counts


# --------------------------------------------------------------------------------------------
# Converted reference HD checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_num", [None, "16"])
def test_converted_reference_hd_checkpoint_keeps_slice_mode(tmp_path, patch_num) -> None:
    # A Llama-style tokenizer with a ',' piece (the corpus has commas) and, like Llama, no '\n' piece.
    corpus = [
        "the quick brown fox, the lazy dog, and a picture of a red square and a blue circle",
        "USER: what is in the image, in row 3 or column 5? ASSISTANT: a small green triangle.",
        "A chat between a curious user and an artificial intelligence assistant, who answers.",
    ] * 40
    tokenizer_dir = train_llama_tokenizer(corpus, tmp_path / "tokenizer", vocab_size=VOCAB)
    clip_dir = write_clip(tmp_path / "clip")
    torch.manual_seed(0)
    direct = TokenPackerLlavaForConditionalGeneration(
        TokenPackerLlavaConfig(
            vision_config=tiny_vision_config("clip", num_layers=4),
            text_config=tiny_text_config("llama", vocab_size=VOCAB),
            scale_factor=2,
            image_token_id=VOCAB,
        )
    )
    src = tmp_path / "reference"
    write_reference_folder(src, direct, clip_dir, tokenizer_dir)
    reference = json.loads((src / "config.json").read_text())
    reference["image_aspect_ratio"] = "slice"
    if patch_num is not None:
        reference["patch_num"] = (
            patch_num  # the reference reads it with int(getattr(config, "patch_num", "9"))
        )
    (src / "config.json").write_text(json.dumps(reference))

    dst = tmp_path / "converted"
    assert cli_main(["convert", "--src", str(src), "--dst", str(dst)]) == 0
    converted = TokenPackerLlavaConfig.from_pretrained(dst)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert converted.image_aspect_ratio == "slice"
    assert converted.patch_num == (9 if patch_num is None else 16)
    comma = tokenizer.convert_tokens_to_ids(",")
    assert comma != tokenizer.unk_token_id and tokenizer.decode([comma]) == ","
    # As the reference looked them up: the ',' piece and, with no '\n' piece, <unk>.
    assert converted.slice_separator_ids == [comma, tokenizer.unk_token_id]
    loaded = load_model(dst, template="vicuna_v1")
    visual = loaded.images()(str(write_image(tmp_path)))
    assert visual.token_ids.count(tokenizer.unk_token_id) == visual.plan.rows + (visual.plan.num_tiles > 1)


def write_image(folder: Path) -> Path:
    path = folder / "wide.png"
    Image.new("RGB", (200, 90), (10, 20, 30)).save(path)
    return path
