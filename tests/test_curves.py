"""Training curves: reading log histories from runs and checkpoints, and the PNG they draw."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tokenpacker_llava.cli import main as cli
from tokenpacker_llava.training.curves import (
    auto_smoothing,
    find_log_history,
    plot_training_curves,
    series,
    smoothed,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(steps: int, *, eval_every: int = 10, scale: float = 1.0) -> list[dict]:
    entries: list[dict] = []
    for step in range(1, steps + 1):
        entries.append(
            {
                "step": step,
                "loss": scale * (2 + math.cos(step)) / math.sqrt(step),
                "learning_rate": 1e-3 * min(1.0, step / 5),
                "grad_norm": 1 + 1 / step,
                "tokens_per_second": 1000.0 + step,
            }
        )
        if step % eval_every == 0:
            entries.append({"step": step, "eval_loss": scale / math.sqrt(step), "eval_runtime": 0.1})
    entries.append({"step": steps, "train_loss": 1.0, "train_runtime": 3.0})  # the end-of-training entry
    return entries


def write_state(folder: Path, entries: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1, "log_history": entries}))
    return folder


def test_series_takes_finite_values_of_one_key() -> None:
    entries = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "eval_loss": 1.0}]
    assert series(entries, "loss") == ([1], [2.0])
    assert series(entries, "eval_loss") == ([3], [1.0])
    assert series(entries, "grad_norm") == ([], [])


def test_smoothing_is_bias_corrected_and_scales_with_the_run() -> None:
    assert smoothed([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # no pull towards 0
    assert smoothed([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert auto_smoothing(0) == auto_smoothing(30) == 0.0 and auto_smoothing(60) == 0.5
    assert auto_smoothing(300) == pytest.approx(0.9) and auto_smoothing(3000) == pytest.approx(0.99)


def test_the_log_history_of_a_finished_run_a_run_in_progress_and_a_file(tmp_path) -> None:
    run = tmp_path / "run"
    write_state(run / "checkpoint-10", history(10))
    write_state(run / "checkpoint-20", history(20))
    (run / "checkpoint-5").mkdir()  # an interrupted save: no state file
    entries, source = find_log_history(run)  # in progress: the newest checkpoint with a state
    assert source == run / "checkpoint-20" / "trainer_state.json" and len(series(entries, "loss")[0]) == 20
    write_state(run, history(30))
    assert find_log_history(run)[1] == run / "trainer_state.json"  # finished: the run's own
    assert find_log_history(run / "checkpoint-10" / "trainer_state.json")[1].parent.name == "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="no trainer_state.json in"):
        find_log_history(tmp_path / "empty")


def test_plot_draws_one_or_several_runs(tmp_path) -> None:
    single = plot_training_curves({"a": history(40)}, tmp_path / "one.png", title="stage 2")
    overlay = plot_training_curves({"a": history(40), "b": history(25, scale=0.5)}, tmp_path / "two.png")
    for path in (single, overlay):
        assert path.read_bytes()[:8] == PNG_MAGIC
        width, height = Image.open(path).size
        assert width > 1000 and height > 700  # two columns, two rows of panels
    # Only the panels with data: a history with losses alone draws one panel.
    losses_only = [{"step": step, "loss": 1.0 / step} for step in range(1, 5)]
    width, _ = Image.open(plot_training_curves({"x": losses_only}, tmp_path / "loss.png")).size
    assert width < 1000
    evaluated_only = [{"step": 5, "eval_loss": 1.0}]  # logging less often than evaluating
    assert plot_training_curves({"x": evaluated_only}, tmp_path / "eval.png").is_file()
    with pytest.raises(ValueError, match="no training metrics"):
        plot_training_curves({"x": [{"step": 1, "train_runtime": 1.0}]}, tmp_path / "none.png")


def test_plot_command(tmp_path, capsys) -> None:
    first = write_state(tmp_path / "lr1e-3", history(30))
    second = write_state(tmp_path / "lr2e-4" / "checkpoint-20", history(20, scale=0.8)).parent
    assert cli(["plot", str(first)]) == 0
    assert (first / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    output = tmp_path / "compare.png"
    assert cli(["plot", str(first), str(second), "--output", str(output), "--smoothing", "0"]) == 0
    assert output.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "checkpoint-20/trainer_state.json" in printed and str(output) in printed
    with pytest.raises(SystemExit, match="--smoothing 1.0: must be in"):
        cli(["plot", str(first), "--smoothing", "1"])
