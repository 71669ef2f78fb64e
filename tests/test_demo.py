"""A shortened demo (a few steps of every phase) through the same code path as `make demo`."""

from __future__ import annotations

import json

import pytest

from tokenpacker_llava import TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.demo import synthetic
from tokenpacker_llava.demo.run import main


def test_quick_demo_runs_end_to_end(tmp_path, capsys) -> None:
    assert main(["--quick", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy on held-out questions" in out and "chat sample" in out
    for kind in synthetic.QUESTION_TYPES:
        assert kind in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {*synthetic.QUESTION_TYPES, "all"}
    model = TokenPackerLlavaForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    assert model.config.projector_type == "tokenpacker" and model.num_image_tokens == 16
    assert (tmp_path / "stage1" / "projector.safetensors").is_file()
    # Stage 2 evaluates held-out conversations (eval_steps 1 with 2 steps: steps 1 and 2).
    assert [step for step, _ in results["validation_loss"]] == [1, 2]
    assert "stage-2 loss on held-out conversations" in out
    assert (tmp_path / "stage2" / "training_curves.png").is_file()
    # Stage 1 logs every 10 steps: its 2 quick steps log nothing to draw, which is no error.
    assert not (tmp_path / "stage1" / "training_curves.png").exists()


def test_quick_demo_in_slice_mode(tmp_path, capsys) -> None:
    """TokenPacker-HD mode through the same path: a 64 px image is one tile plus a newline."""
    assert main(["--quick", "--output_dir", str(tmp_path), "--image_aspect_ratio", "slice"]) == 0
    assert "accuracy on held-out questions" in capsys.readouterr().out
    model = TokenPackerLlavaForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    assert model.config.image_aspect_ratio == "slice" and model.config.patch_num == 9
    assert len(model.config.slice_separator_ids) == 2


def test_synthetic_data_is_deterministic(tmp_path) -> None:
    first = synthetic.write_split(tmp_path / "a", "eval", 20, seed=3).read_text()
    second = synthetic.write_split(tmp_path / "b", "eval", 20, seed=3).read_text()
    assert first == second
    assert (tmp_path / "a" / "images" / "eval_00007.png").read_bytes() == (
        tmp_path / "b" / "images" / "eval_00007.png"
    ).read_bytes()
    questions = json.loads(first)
    assert {q["type"] for q in questions} == set(synthetic.QUESTION_TYPES)
    baseline = synthetic.majority_baseline(questions)
    assert all(0 < value <= 1 for value in baseline.values())


def test_described_scene_replaces_the_image_by_one_token_per_cell(tmp_path) -> None:
    """The LLM's pretraining sees the stage-2 token layout with the 16 image placeholders
    replaced by the scene's cell symbols, each one token."""
    from transformers import AutoTokenizer

    from tokenpacker_llava.demo import parts
    from tokenpacker_llava.tokenization import ensure_image_token

    conversations = synthetic.described_conversations(20, seed=1)
    corpus = [text for c in conversations for _, text in c.turns]
    folder = parts.train_tokenizer(corpus, tmp_path / "tok", vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_token_id = ensure_image_token(tokenizer)
    for conversation in conversations[:4]:  # plain captions and vicuna questions alternate
        ids, labels = parts._described_sample(conversation, tokenizer, image_token_id)
        symbols = tokenizer.convert_tokens_to_ids(conversation.scene.symbols())
        assert tokenizer.unk_token_id not in symbols
        start = ids.index(symbols[0])
        assert ids[start : start + 16] == symbols and image_token_id not in ids
        assert all(label == -100 for label in labels[start : start + 16])
        assert any(label != -100 for label in labels[start + 16 :])


def test_described_scene_on_the_patch_grid(tmp_path) -> None:
    """Side 8 describes the scene per patch (the per-patch MLP's 64 tokens): each position
    carries the symbol of the cell it lies in, in reading order."""
    from transformers import AutoTokenizer

    from tokenpacker_llava.demo import parts
    from tokenpacker_llava.tokenization import ensure_image_token

    conversation = synthetic.described_conversations(1, seed=2)[0]
    scene = conversation.scene
    cells, patches = scene.symbols(), scene.symbols(8)
    assert len(cells) == 16 and len(patches) == 64
    for row in range(8):
        for col in range(8):
            assert patches[row * 8 + col] == cells[(row // 2) * 4 + col // 2]
    with pytest.raises(ValueError, match="does not tile"):
        scene.symbols(6)
    corpus = [text for c in synthetic.described_conversations(20, seed=1) for _, text in c.turns]
    tokenizer = AutoTokenizer.from_pretrained(parts.train_tokenizer(corpus, tmp_path / "tok", vocab_size=400))
    image_token_id = ensure_image_token(tokenizer)
    ids, _ = parts._described_sample(conversation, tokenizer, image_token_id, side=8)
    symbols = tokenizer.convert_tokens_to_ids(patches)
    start = ids.index(symbols[0])
    assert ids[start : start + 64] == symbols and image_token_id not in ids


def test_vision_probe_positions() -> None:
    from tokenpacker_llava.demo import parts

    assert parts.CellProbe(8, "cell").positions(8).tolist() == list(range(16))
    per_patch = parts.CellProbe(8, "patch").positions(8).view(8, 8)
    for row in range(8):
        for col in range(8):
            assert per_patch[row, col] == (row // 2) * 4 + col // 2
    with pytest.raises(ValueError, match="unknown vision probe"):
        parts.CellProbe(8, "pixel")
