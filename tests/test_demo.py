"""A shortened demo (a few steps of every phase) through the same code path as `make demo`."""

from __future__ import annotations

import json

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
