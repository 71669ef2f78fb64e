"""The dataset end to end: bad-row policy, `data check`, `data show`, and a skip-mode pass
through the collator and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_SIZE, tiny_model
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, CLIPImageProcessor

from tokenpacker_llava.cli import main
from tokenpacker_llava.data.check import check_dataset
from tokenpacker_llava.data.collate import PackedCollator
from tokenpacker_llava.data.dataset import SampleBuilder, StreamingLlavaDataset, build_dataset
from tokenpacker_llava.data.records import BadSample
from tokenpacker_llava.data.sources import parse_data_path
from tokenpacker_llava.data.templates import get_template
from tokenpacker_llava.tokenization import ensure_image_token

TOKENS_PER_IMAGE = 36  # the tiny model: 12x12 grid, s=2
MAX_LENGTH = 180  # one image (36 tokens) plus the vicuna prompt fits; three images do not


def qa(question: str, answer: str, image: bool = False) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": ("<image>\n" if image else "") + question},
        {"from": "gpt", "value": answer},
    ]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (64, 40), (200, 30, 30)).save(images / "red.jpg")
    Image.new("L", (30, 50), 128).save(images / "grey.png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "secret.png").write_bytes((images / "grey.png").read_bytes())
    rows = [
        {"id": "good-image", "image": "red.jpg", "conversations": qa("What colour?", "Red.", image=True)},
        {"id": "good-text", "conversations": qa("Say hi.", "Hi there.") + qa("Again?", "Hi again.")},
        {"id": "missing", "image": "nope.jpg", "conversations": qa("What?", "Something.", image=True)},
        {"id": "zero-byte", "image": "empty.jpg", "conversations": qa("What?", "Something.", image=True)},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": qa("What?", "Something.", image=True)},
        {"id": "escape", "image": "../secret.png", "conversations": qa("What?", "Something.", image=True)},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hello?"}]},
        {"id": "empty-answer", "conversations": qa("Why?", "")},
        {"id": "count", "image": "red.jpg", "conversations": qa("What colour?", "Red.")},
        {
            "id": "non-string",
            "conversations": [{"from": "human", "value": "n?"}, {"from": "gpt", "value": 42}],
        },
        {
            "id": "too-long",
            "image": ["red.jpg", "grey.png", "red.jpg"],
            "conversations": qa("<image><image><image> Compare.", "They differ."),
        },
        {"id": "good-grey", "image": "grey.png", "conversations": qa("Shade?", "Mid grey.", image=True)},
    ]
    (root / "data.json").write_text(json.dumps(rows))
    return root


BAD_KINDS = {
    "missing": "missing_image",
    "zero-byte": "empty_image",
    "corrupt": "corrupt_image",
    "escape": "image_outside_folder",
    "no-answer": "no_assistant_turn",
    "empty-answer": "empty_answer",
    "count": "image_count_mismatch",
    "non-string": "non_string_value",
    "too-long": "too_long",
}


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    ensure_image_token(tokenizer)
    return tokenizer


def builder_for(tokenizer) -> SampleBuilder:
    return SampleBuilder(
        tokenizer,
        get_template("vicuna_v1"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tokens_per_image=TOKENS_PER_IMAGE,
        max_length=MAX_LENGTH,
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE),
    )


def test_error_policy_stops_at_the_first_bad_row(dataset_dir, tokenizer) -> None:
    sources = parse_data_path(str(dataset_dir / "data.json"), str(dataset_dir / "images"))
    dataset = build_dataset(sources, builder_for(tokenizer), on_bad_sample="error")
    assert len(dataset) == 12
    good = dataset[0]
    assert good["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (good["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum() == TOKENS_PER_IMAGE
    assert dataset[1]["pixel_values"] is None
    for index in range(2, 11):
        with pytest.raises(BadSample) as info:
            dataset[index]
        row_id = json.loads((dataset_dir / "data.json").read_text())[index]["id"]
        assert info.value.kind == BAD_KINDS[row_id] and info.value.row == index
        assert f"row {index}" in str(info.value)


def test_skip_policy_trains_through_and_reports_every_bad_row(dataset_dir, tokenizer) -> None:
    sources = parse_data_path(str(dataset_dir / "data.json"), str(dataset_dir / "images"))
    dataset = build_dataset(sources, builder_for(tokenizer), on_bad_sample="skip")
    model = tiny_model(text_overrides={"vocab_size": len(tokenizer)})
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    loader = DataLoader(dataset, batch_size=4, collate_fn=PackedCollator(), num_workers=2)
    skipped: set[str] = set()
    steps = 0
    for batch in loader:
        skipped.update(batch.pop("skipped_samples", []))
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        steps += 1
    assert steps == 3
    assert len(skipped) == len(BAD_KINDS)  # every bad row reported once, by row and reason
    for kind in BAD_KINDS.values():
        assert any(kind in description for description in skipped), kind


def test_streaming_dataset(dataset_dir, tokenizer) -> None:
    sources = parse_data_path(str(dataset_dir / "data.json"), str(dataset_dir / "images"))
    stream = StreamingLlavaDataset(sources, builder_for(tokenizer), on_bad_sample="skip")
    samples = list(stream)
    assert [s["id"] for s in samples] == ["good-image", "good-text", "good-grey"]
    assert len(samples[2]["skipped"]) == len(BAD_KINDS)
    with pytest.raises(BadSample, match="row 2"):
        list(StreamingLlavaDataset(sources, builder_for(tokenizer), on_bad_sample="error"))


def test_streaming_shuffles_within_a_buffer_the_same_way_on_every_rank(tmp_path, tokenizer) -> None:
    rows = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
        for i in range(40)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    sources = parse_data_path(str(path))

    def ids(epoch: int = 0, **options) -> list[str]:
        stream = StreamingLlavaDataset(sources, builder_for(tokenizer), seed=3, **options)
        stream.set_epoch(epoch)
        return [sample["id"] for sample in stream]

    in_order = [row["id"] for row in rows]
    assert ids(shuffle_buffer=0) == in_order
    shuffled = ids(shuffle_buffer=16)
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert ids(shuffle_buffer=16) == shuffled  # what another rank reads
    assert ids(1, shuffle_buffer=16) != shuffled  # a new order each epoch
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0"):
        ids(shuffle_buffer=-1)


def test_check_dataset_reports_each_bad_row(dataset_dir, tokenizer) -> None:
    sources = parse_data_path(str(dataset_dir / "data.json"), str(dataset_dir / "images"))
    report = check_dataset(
        sources,
        tokenizer=tokenizer,
        template=get_template("vicuna_v1"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tokens_per_image=TOKENS_PER_IMAGE,
        max_length=MAX_LENGTH,
        num_workers=2,
    )
    assert report.rows == 12 and report.invalid == len(BAD_KINDS)
    assert dict(report.problems) == {kind: 1 for kind in BAD_KINDS.values()}
    assert len(report.lengths) == 3 and min(report.lengths) > TOKENS_PER_IMAGE
    assert (
        report.images == 5
    )  # the two good rows and the three of the too-long row (decoded before tokenizing)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_data_check_cli(dataset_dir, tokenizer, tmp_path, capsys) -> None:
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    common = ["--data_path", str(dataset_dir / "data.json"), "--image_folder", str(dataset_dir / "images")]
    code, out = run_cli(
        capsys,
        "data",
        "check",
        *common,
        "--tokenizer",
        str(tokenizer_dir),
        "--num_image_tokens",
        "36",
        "--model_max_length",
        str(MAX_LENGTH),
        "--num_workers",
        "2",
    )
    assert code == 1
    assert "rows: 12" in out and "invalid rows: 9" in out
    for row_id, kind in BAD_KINDS.items():
        assert kind in out and f"id '{row_id}'" in out
    assert "p95" in out and "with 36 visual tokens per image" in out

    good = tmp_path / "good.json"
    good.write_text(json.dumps([json.loads((dataset_dir / "data.json").read_text())[i] for i in (0, 1, 11)]))
    code, out = run_cli(
        capsys, "data", "check", "--data_path", str(good), "--image_folder", str(dataset_dir / "images")
    )
    assert code == 0 and "invalid rows: 0" in out and "estimate" in out


def test_data_show_cli(dataset_dir, tokenizer, tmp_path, capsys) -> None:
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    common = [
        "--data_path",
        str(dataset_dir / "data.json"),
        "--tokenizer",
        str(tokenizer_dir),
        "--num_image_tokens",
        "36",
    ]
    code, out = run_cli(capsys, "data", "show", *common, "--index", "1", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["id"] == "good-text" and shown["num_images"] == 0
    assert [text.strip() for text in shown["supervised_text"]] == ["Hi there.</s>", "Hi again.</s>"]
    assert len(shown["input_ids"]) == len(shown["labels"]) == shown["num_tokens"]
    code, out = run_cli(capsys, "data", "show", *common, "--index", "0")
    assert code == 0 and "<image x36>" in out and "⟦" in out and "Red.</s>⟧" in out.replace(" </s>", "</s>")


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory) -> Path:
    """One row whose 672 x 336 image slices into a 1 x 2 grid at 336 px views (+ a global view)."""
    root = tmp_path_factory.mktemp("wide")
    Image.new("RGB", (672, 336), (10, 200, 10)).save(root / "wide.png")
    rows = [
        {"id": "wide", "image": "wide.png", "conversations": qa("What is it?", "A green band.", image=True)}
    ]
    (root / "data.json").write_text(json.dumps(rows))
    return root


def test_check_dataset_in_slice_mode_counts_each_image_grid(wide_dataset, tokenizer) -> None:
    from tokenpacker_llava.data.slicing import layout_length, plan_slices

    plan = plan_slices(336, 672, 9, (336, 336))
    assert (plan.rows, plan.cols) == (1, 2)
    sliced_tokens = layout_length(plan.num_tiles, TOKENS_PER_IMAGE)
    assert sliced_tokens == 3 * (TOKENS_PER_IMAGE + 1)  # two tiles + the global view, one separator each
    common = dict(
        tokenizer=tokenizer,
        template=get_template("vicuna_v1"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tokens_per_image=TOKENS_PER_IMAGE,
        num_workers=1,
    )
    sources = parse_data_path(str(wide_dataset / "data.json"), str(wide_dataset))
    padded = check_dataset(sources, max_length=None, **common)
    sliced = check_dataset(sources, max_length=None, patch_num=9, **common)
    assert sliced.lengths[0] - padded.lengths[0] == sliced_tokens - TOKENS_PER_IMAGE
    # A budget that fits the padded sample but not the sliced one's image: too long in slice mode.
    budget = padded.lengths[0] + 10
    assert check_dataset(sources, max_length=budget, **common).invalid == 0
    report = check_dataset(sources, max_length=budget, patch_num=9, **common)
    assert report.problems == {"too_long": 1}
    assert "per view (slice mode, up to 9 tiles" in sliced.format(None, TOKENS_PER_IMAGE, True, patch_num=9)


def test_data_check_and_show_cli_in_slice_mode(wide_dataset, tokenizer, tmp_path, capsys) -> None:
    from tokenpacker_llava.tokenization import slice_separator_ids

    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    common = [
        "--data_path",
        str(wide_dataset / "data.json"),
        "--image_folder",
        str(wide_dataset),
        "--tokenizer",
        str(tokenizer_dir),
        "--num_image_tokens",
        str(TOKENS_PER_IMAGE),
        "--image_aspect_ratio",
        "slice",
    ]
    code, out = run_cli(capsys, "data", "check", *common, "--num_workers", "1")
    assert code == 0 and "invalid rows: 0" in out and "per view (slice mode, up to 9 tiles" in out
    code, out = run_cli(capsys, "data", "show", *common, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["slice_grids"] == ["1x2"]
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    comma, newline = slice_separator_ids(tokenizer)
    ids = shown["input_ids"]
    start = ids.index(image_token_id)
    view = [image_token_id] * TOKENS_PER_IMAGE
    assert ids[start : start + 3 * (TOKENS_PER_IMAGE + 1)] == view + [comma] + view + [newline] + view + [
        newline
    ]
    code, out = run_cli(capsys, "data", "show", *common)
    assert (
        code == 0
        and "slice grids 1x2 + a global view each" in out
        and out.count(f"<image x{TOKENS_PER_IMAGE}>") == 3
    )
    with pytest.raises(SystemExit):
        main(["data", "check", *common, "--patch_num", "7"])
