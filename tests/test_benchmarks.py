"""The benchmark scripts run in --quick mode so they never rot (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import projector  # noqa: E402


def test_projector_benchmark_quick(capsys) -> None:
    result = projector.main(["--quick"])
    out = capsys.readouterr().out
    assert "reference-style" in out and "tokenpacker_llava" in out
    assert result["difference"] < 1e-5  # same weights, same inputs: the same function
    assert all(seconds > 0 for seconds in result["rows"].values())


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
