"""Checkpoint completeness, ``--resume_from_checkpoint auto``, and preemption signals.

A checkpoint folder counts only once every rank has finished writing it: the trainer then
writes a ``.complete`` marker. A run killed mid-save leaves a folder without the marker,
which ``auto`` resume (and checkpoint rotation) ignore, so the previous checkpoint stays
usable. SIGTERM and SIGUSR1 (cluster preemption, SLURM ``--signal``) ask the trainer to
save a checkpoint at the end of the current step and stop.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def mark_complete(checkpoint: str | Path) -> None:
    (Path(checkpoint) / COMPLETE_MARKER).write_text("complete\n")


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, oldest (smallest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [path for _, path in sorted(found)]


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [path for path in checkpoints(output_dir) if is_complete(path)]
    for path in checkpoints(output_dir):
        if not is_complete(path):
            logger.warning(
                "ignoring incomplete checkpoint %s (no %s marker: interrupted while saving)",
                path,
                COMPLETE_MARKER,
            )
    return complete[-1] if complete else None


def unmark_complete(checkpoint: str | Path) -> None:
    """Before (re)writing a checkpoint folder: until the new marker, it is not complete."""
    (Path(checkpoint) / COMPLETE_MARKER).unlink(missing_ok=True)


def resolve_resume(requested: str | None, output_dir: str | Path) -> str | None:
    """``auto`` -> the latest complete checkpoint (or None); a path must be complete.

    A fresh start (None) in a folder that already holds checkpoints is refused: the new run's
    checkpoints would mix with the old ones, and a later ``auto`` resume could pick an old one.
    """
    if requested is None:
        existing = checkpoints(output_dir)
        if existing:
            names = ", ".join(path.name for path in existing[-3:])
            raise ValueError(
                f"{output_dir} already holds checkpoints of an earlier run ({names}): continue it with "
                "--resume_from_checkpoint auto (scripts: RESUME=auto), or start over in another --output_dir "
                "or after deleting them"
            )
        return None
    if requested == "auto":
        latest = latest_complete_checkpoint(output_dir)
        logger.info("resume auto: %s", latest or "no complete checkpoint, starting from scratch")
        return str(latest) if latest else None
    if not is_complete(requested):
        raise ValueError(f"{requested} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return requested


def rotate(output_dir: str | Path, keep: int | None, protect: Sequence[Path] = ()) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``, never one in ``protect`` (the one
    just written, the best one); incomplete ones are removed too, except the newest folder, which
    may be one being written by a concurrent save."""
    if not keep:
        return
    existing = checkpoints(output_dir)
    complete = [path for path in existing if is_complete(path)]
    protected = {Path(path).resolve() for path in protect}
    for path in complete[: max(0, len(complete) - keep)]:
        if path.resolve() not in protected:
            logger.info("deleting old checkpoint %s (save_total_limit %d)", path, keep)
            shutil.rmtree(path, ignore_errors=True)
    for path in existing[:-1]:
        if not is_complete(path) and path.exists():
            logger.info("deleting incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGUSR1: save a checkpoint after the current step, then stop.

    All ranks must take the same decision, so the flag is all-reduced each step when training
    is distributed (a signal may reach only some processes). ``stopped_by`` then names the signal
    on every rank, so the run can end without writing its final artifacts.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.stopped_by: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: saving a checkpoint after this step, then stopping", self.signal_name)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        requested = self.requested
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if requested else 0.0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_by = self.signal_name or "a preemption signal (on another rank)"
        return control
