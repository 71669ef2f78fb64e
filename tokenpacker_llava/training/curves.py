"""Training curves as a PNG: loss (training and evaluation), learning rate, gradient norm, tokens/s.

Read from transformers' log history (``TrainerState.log_history``, saved in every
``trainer_state.json``), against the optimizer step. Training draws ``training_curves.png``
into its output folder at the end; ``tokenpacker-llava plot RUN [RUN ...]`` draws one or
several runs (overlaid, for comparing settings) at any time, also from the newest checkpoint
of a run still in progress.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenpacker_llava.training.checkpoints import checkpoints

STATE_FILE = "trainer_state.json"
CURVES_FILE = "training_curves.png"

# (log key, panel title, log-scale y axis); the loss panel also draws "eval_loss".
PANELS = (
    ("loss", "loss", False),
    ("learning_rate", "learning rate", False),
    ("grad_norm", "gradient norm", True),
    ("tokens_per_second", "tokens/s (all ranks)", False),
)


def find_log_history(run: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """The log history of ``run`` (a run folder, a checkpoint folder or a trainer_state.json)
    and the file it came from: the run's own state file once training ended, else its newest
    checkpoint's."""
    path = Path(run)
    candidates = [path] if path.is_file() else [path / STATE_FILE]
    if path.is_dir():
        candidates += [checkpoint / STATE_FILE for checkpoint in reversed(checkpoints(path))]
    for candidate in candidates:
        if candidate.is_file():
            history = json.loads(candidate.read_text()).get("log_history")
            if not isinstance(history, list):
                raise ValueError(f"{candidate} holds no log_history list")
            return history, candidate
    raise FileNotFoundError(f"no {STATE_FILE} in {path} or in its checkpoint-N folders")


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the log entries that have it (finite values only)."""
    points = [
        (int(entry["step"]), float(entry[key]))
        for entry in history
        if key in entry
        and "step" in entry
        and isinstance(entry[key], int | float)
        and math.isfinite(entry[key])
    ]
    return [step for step, _ in points], [value for _, value in points]


def _has(history: Sequence[Mapping[str, Any]], panel_key: str) -> bool:
    keys = (panel_key, "eval_loss") if panel_key == "loss" else (panel_key,)
    return any(series(history, key)[0] for key in keys)


def plottable(history: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``history`` holds any metric ``plot_training_curves`` draws."""
    return any(_has(history, key) for key, _, _ in PANELS)


def auto_smoothing(points: int) -> float:
    """An EMA weight averaging over about 1/30 of the points (none for 30 points or fewer)."""
    return max(0.0, 1.0 - 30.0 / points) if points else 0.0


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's start-up bias correction."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**index))
    return out


def plot_training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    output: str | Path,
    *,
    smoothing: float | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``runs`` (label -> log history) into ``output`` (PNG); returns the path.

    Raw training losses are drawn thin, with an exponential moving average on top (weight
    ``smoothing``; None: ``auto_smoothing`` of each run's count; 0: raw only); evaluation losses
    are points. Panels without any data are left out.
    """
    # The object-oriented API: no pyplot, so no global backend or figure state is touched.
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to plot")
    panels = [panel for panel in PANELS if any(_has(history, panel[0]) for history in runs.values())]
    if not any(plottable(history) for history in runs.values()):
        raise ValueError("the log history holds no training metrics yet (nothing logged)")
    columns = min(len(panels), 2)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.4 * columns, 3.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    colours = [f"C{index}" for index in range(len(runs))]
    for ax, (key, name, log_scale) in zip(axes, panels, strict=False):
        for colour, (label, history) in zip(colours, runs.items(), strict=True):
            steps, values = series(history, key)
            weight = auto_smoothing(len(values)) if smoothing is None else smoothing
            if key == "loss" and weight > 0:
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smoothed(values, weight), color=colour, label=f"{label} train")
            elif steps:
                ax.plot(steps, values, color=colour, label=f"{label} train" if key == "loss" else label)
            if key == "loss":
                eval_steps, eval_values = series(history, "eval_loss")
                if eval_steps:
                    ax.plot(eval_steps, eval_values, "o--", color=colour, markersize=4, label=f"{label} eval")
        ax.set_title(name)
        ax.set_xlabel("step")
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if key == "loss" or len(runs) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    return output
