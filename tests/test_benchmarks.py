"""The benchmark scripts run in --quick mode so they never rot (no timing assertions)."""

from __future__ import annotations

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
    assert "padded + grouped (LLaVA)" in out and "packed (padding-free)" in out
    assert result["loss_difference"] < 1e-4  # packing is a pure layout change: equal losses
