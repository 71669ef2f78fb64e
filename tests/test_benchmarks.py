"""The benchmark scripts run in --quick mode so they never rot (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import projector  # noqa: E402


def test_projector_benchmark_quick(capsys) -> None:
    result = projector.main(["--quick", "--compile"])
    out = capsys.readouterr().out
    assert "reference-style" in out and "tokenpacker_llava" in out and projector.COMPILED in out
    assert result["difference"] < 1e-5  # same weights, same inputs: the same function
    assert result["compiled_difference"] < 1e-5
    assert set(result["rows"]) == {projector.REFERENCE, projector.OURS, projector.COMPILED}
    assert all(seconds > 0 for seconds in result["rows"].values())


def test_vision_benchmark_quick(capsys) -> None:
    import vision

    result = vision.main(["--quick"])
    out = capsys.readouterr().out
    assert "torch.compile" in out and "images/s" in out
    assert set(result["rows"]) == {vision.EAGER, vision.COMPILED}
    assert result["difference"] < 1e-4 and all(seconds > 0 for seconds in result["rows"].values())


def test_packing_benchmark_quick(capsys) -> None:
    import packing

    result = packing.main(["--quick"])
    out = capsys.readouterr().out
    assert packing.BASELINE in out and packing.PACKED in out and "block mask" in out
    assert set(result["results"]) == {packing.BASELINE, "packed, sdpa (block mask)", packing.PACKED}
    assert result["loss_difference"] < 1e-4  # packing is a pure layout change: equal losses


def test_projector_shootout_quick(tmp_path, capsys) -> None:
    import projectors

    assert projectors.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Projector shoot-out" in out and "mlp2x_gelu" in out and "tokenpacker" in out
    report = json.loads((tmp_path / "results.json").read_text())
    tokens = {(run["projector"], run["scale"]): run["tokens"] for run in report["runs"]}
    assert tokens == {("mlp2x_gelu", 1): 64, ("tokenpacker", 2): 16}
    assert all(run["projector_params"] > 0 and 0 <= run["accuracy"]["all"] <= 1 for run in report["runs"])
    png = tmp_path / "accuracy_vs_tokens.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_benchmark_quick(capsys) -> None:
    import math

    import step

    result = step.main(["--quick"])
    out = capsys.readouterr().out
    assert "attention sdpa_varlen" in out and "MFU" in out and "TFLOP/step" in out
    rows = result["rows"]
    labels = ("mlp2x_gelu", "tokenpacker s2", "tokenpacker s3")
    assert set(rows) == {(stage, label) for stage in (1, 2) for label in labels}
    for (stage, label), row in rows.items():
        assert not row["oom"]
        assert row["stage"] == stage and row["projector"] == label
        assert f"{stage:<6} {label:<16} {row['visual_tokens']:>6}" in out  # a printed table row
        assert row["tokens_per_s"] > 0 and row["model_flops_per_step"] > 0
        assert isinstance(row["mfu"], float) and math.isfinite(row["mfu"]) and row["mfu"] > 0
        assert math.isfinite(row["loss"]) and math.isnan(row["peak_gib"])  # no GPU memory on CPU
    # 6x6 patch grid: every patch (MLP), 2x2 regions, 3x3 regions.
    assert {label: rows[(2, label)]["visual_tokens"] for label in labels} == {
        "mlp2x_gelu": 36,
        "tokenpacker s2": 9,
        "tokenpacker s3": 4,
    }
    for label in labels:
        stage1, stage2 = rows[(1, label)], rows[(2, label)]
        assert stage1["visual_tokens"] == stage2["visual_tokens"]
        assert stage2["model_flops_per_step"] > stage1["model_flops_per_step"]  # + LLM weight gradients
        assert stage2["trainable_params"] > stage1["trainable_params"]  # stage 1 trains the projector only


def test_loss_benchmark_quick(capsys) -> None:
    import loss

    result = loss.main(["--quick"])
    out = capsys.readouterr().out
    assert loss.BASELINE in out and "chunked, 128 tokens" in out and "peak MiB" in out
    assert set(result) == {loss.BASELINE, "chunked, 128 tokens"}
    for row in result.values():  # the same loss and gradients, each variant in its own process
        assert row["loss_difference"] < 1e-5 and row["grad_difference"] < 1e-5
        assert row["ms"] > 0 and 0 < row["targets"] < row["tokens"]
