"""Parsing LLaVA records and loading/mixing sources."""

from __future__ import annotations

import json

import datasets
import pytest

from tokenpacker_llava.data.records import BadSample, Turn, parse_record
from tokenpacker_llava.data.sources import DataSource, MixedRecords, parse_data_path

GOOD = {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."},
    ],
}


def test_parse_good_record() -> None:
    record = parse_record(GOOD, row=7, source="mix.json")
    assert record.id == "000000033471" and record.row == 7 and record.images == [GOOD["image"]]
    assert record.turns[0] == Turn("user", GOOD["conversations"][0]["value"])
    assert [t.role for t in record.turns] == ["user", "assistant", "user", "assistant"]
    text_only = parse_record({"id": 5, "conversations": GOOD["conversations"][2:]}, row=0)
    assert text_only.id == "5" and not text_only.images
    system = parse_record(
        {"id": "s", "conversations": [{"from": "system", "value": "Be terse."}, *GOOD["conversations"][2:]]}
    )
    assert system.turns[0].role == "system"
    multi = parse_record(
        {
            "id": "m",
            "image": ["a.png", "b.png"],
            "conversations": [
                {"from": "human", "value": "<image> vs <image>?"},
                {"from": "gpt", "value": "same"},
            ],
        }
    )
    assert multi.images == ["a.png", "b.png"]


def convo(*pairs):
    return [{"from": speaker, "value": value} for speaker, value in pairs]


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("<image>\nWhat is this?", "<image>\nWhat is this?"),
        ("What is this?\n<image>", "<image>\nWhat is this?"),
        ("What is <image> this? ", "<image>\nWhat is  this?"),
        ("<image>", "<image>"),
    ],
)
def test_a_single_image_moves_to_the_front_of_its_turn(question: str, expected: str) -> None:
    record = parse_record(
        {"id": "x", "image": "a.jpg", "conversations": convo(("human", question), ("gpt", "a"))}
    )
    assert record.turns[0].text == expected
    # Several images in one turn stay where the text puts them.
    two = "Compare <image> with <image>."
    record = parse_record(
        {"id": "y", "image": ["a.jpg", "b.jpg"], "conversations": convo(("human", two), ("gpt", "a"))}
    )
    assert record.turns[0].text == two


BAD_ROWS = [
    ("not an object", "malformed"),
    ({"id": "x"}, "malformed"),
    ({"id": "x", "conversations": []}, "malformed"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "malformed"),
    ({"id": "x", "conversations": convo(("human", "hi"), ("gpt", 3))}, "non_string_value"),
    ({"id": "x", "conversations": convo(("human", None), ("gpt", "a"))}, "non_string_value"),
    ({"id": "x", "image": 3, "conversations": convo(("human", "<image>"), ("gpt", "a"))}, "non_string_value"),
    ({"id": "x", "conversations": convo(("robot", "hi"), ("gpt", "a"))}, "unknown_role"),
    ({"id": "x", "conversations": convo(("human", "hi"))}, "no_assistant_turn"),
    ({"id": "x", "conversations": convo(("human", "hi"), ("gpt", "  "))}, "empty_answer"),
    ({"id": "x", "conversations": convo(("gpt", "a"), ("human", "q"))}, "turn_order"),
    ({"id": "x", "conversations": convo(("human", "q"), ("gpt", "a"), ("human", "q2"))}, "turn_order"),
    ({"id": "x", "conversations": convo(("human", "q"), ("human", "q"), ("gpt", "a"))}, "turn_order"),
    (
        {"id": "x", "image": "a.jpg", "conversations": convo(("human", "q"), ("gpt", "a"))},
        "image_count_mismatch",
    ),
    ({"id": "x", "conversations": convo(("human", "<image>\nq"), ("gpt", "a"))}, "image_count_mismatch"),
    (
        {"id": "x", "image": "a.jpg", "conversations": convo(("human", "<image><image>"), ("gpt", "a"))},
        "image_count_mismatch",
    ),
    (
        {"id": "x", "image": "a.jpg", "conversations": convo(("human", "q"), ("gpt", "<image>"))},
        "image_count_mismatch",
    ),
    (  # the plain template drops the system turn: its image would shift onto the user's
        {
            "id": "x",
            "image": ["sys.jpg", "user.jpg"],
            "conversations": convo(("system", "<image> context"), ("human", "<image>\nq"), ("gpt", "a")),
        },
        "image_count_mismatch",
    ),
    ({"id": "x", "conversations": convo(("human", "smile \ud83d"), ("gpt", "a"))}, "invalid_text"),
    (
        {"id": "x", "image": "\udc00.jpg", "conversations": convo(("human", "<image>"), ("gpt", "a"))},
        "invalid_text",
    ),
]


@pytest.mark.parametrize(("raw", "kind"), BAD_ROWS)
def test_bad_rows_name_row_id_and_reason(raw, kind: str) -> None:
    with pytest.raises(BadSample) as info:
        parse_record(raw, row=12)
    assert info.value.kind == kind
    assert "row 12" in str(info.value) and kind in str(info.value)
    if isinstance(raw, dict):
        assert "id 'x'" in str(info.value)


def test_a_lone_surrogate_fails_its_row_not_the_file(tmp_path) -> None:
    # Scraped text cut inside an emoji: JSON can escape half a surrogate pair, Arrow and the
    # tokenizer cannot take it. The file loads; the row is reported by number, id and reason.
    bad = {"id": "cut\ud83d", "conversations": convo(("human", "hi \ud83d"), ("gpt", "a"))}
    good = {"id": "emoji", "conversations": convo(("human", "hi \U0001f600"), ("gpt", "a"))}
    for name, text in (
        ("a.json", json.dumps([good, bad])),
        ("b.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n"),
    ):
        path = tmp_path / name
        path.write_text(text)
        mixed = MixedRecords([DataSource(str(path))])
        assert parse_record(mixed[0][2], row=0).turns[0].text == "hi \U0001f600"
        with pytest.raises(BadSample, match="row 1, id .*cut.*: invalid_text") as info:
            parse_record(mixed[1][2], row=mixed[1][1])
        assert "a lone surrogate" in str(info.value)
        str(info.value).encode("utf-8")  # the message itself can be logged


def test_parse_data_path() -> None:
    sources = parse_data_path("a.json,b.jsonl:0.5, org/name:2", image_folder="imgs")
    assert [(s.path, s.weight, s.image_folder) for s in sources] == [
        ("a.json", 1.0, "imgs"),
        ("b.jsonl", 0.5, "imgs"),
        ("org/name", 2.0, "imgs"),
    ]
    assert parse_data_path(["x.json", "y.json:3"])[1].weight == 3.0
    with pytest.raises(ValueError, match="positive"):
        parse_data_path("a.json:0")
    with pytest.raises(ValueError, match="no data source"):
        parse_data_path(" , ")


def test_sources_keep_bad_rows_addressable_and_mix_by_weight(tmp_path) -> None:
    json_path = tmp_path / "a.json"
    json_path.write_text(
        json.dumps([GOOD, {"id": "bad", "conversations": [{"from": "human", "value": 5}]}] * 5)
    )
    jsonl_path = tmp_path / "b.jsonl"
    jsonl_path.write_text(
        "\n".join([json.dumps(GOOD), "{not json", json.dumps(GOOD), json.dumps(GOOD)]) + "\n"
    )
    mixed = MixedRecords([DataSource(str(json_path), 0.5), DataSource(str(jsonl_path), 2.0)])
    assert len(mixed) == 5 + 8
    rows = [mixed[i] for i in range(len(mixed))]
    assert [row for source, row, _ in rows if source.path == str(json_path)] == [0, 2, 4, 6, 8]
    assert sorted(row for source, row, _ in rows if source.path == str(jsonl_path)) == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    broken = next(raw for source, row, raw in rows if source.path == str(jsonl_path) and row == 1)
    assert broken == "{not json"  # kept as text: reported as malformed by parse_record, not a load failure
    with pytest.raises(BadSample, match="row 1: malformed"):
        parse_record(broken, row=1)
    # A value of the wrong type survives loading as is (no Arrow coercion to a string).
    _, _, raw = mixed[0]
    assert raw["conversations"][0]["value"] == GOOD["conversations"][0]["value"]
    bad_raw = MixedRecords([DataSource(str(json_path))])[1][2]
    assert bad_raw["conversations"][0]["value"] == 5


def test_dataset_folder_loads_through_load_dataset(tmp_path) -> None:
    # A local dataset folder goes through datasets.load_dataset, the same path as a Hub id.
    folder = tmp_path / "hub_like"
    folder.mkdir()
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(folder / "train.parquet"))
    mixed = MixedRecords([DataSource(str(folder))])
    source, row, raw = mixed[1]
    assert row == 1 and parse_record(raw).id == GOOD["id"]


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MixedRecords([DataSource(str(tmp_path / "nope.json"))])
