"""What each training stage trains: explicit, logged freezing and the trainable-parameter table.

- ``pretrain`` (stage 1): the projector only; vision tower and LLM frozen.
- ``finetune`` (stage 2): projector + LLM (full, or LoRA adapters through peft with the
  projector fully trained); the vision tower stays frozen unless asked to train.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.trainer_utils import unwrap_peft_model

logger = logging.getLogger(__name__)

COMPONENTS = ("vision_tower", "projector", "language_model")


def configure_stage(
    model: nn.Module,
    stage: str,
    *,
    train_projector: bool = True,
    train_vision: bool = False,
    train_llm: bool = True,
) -> None:
    """Set ``requires_grad`` for ``stage`` (``pretrain`` or ``finetune``) and log the decision."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"unknown stage {stage!r}")
    if stage == "pretrain":
        train_projector, train_vision, train_llm = True, False, False
    model.requires_grad_(False)
    model.projector.requires_grad_(train_projector)
    model.vision_tower.requires_grad_(train_vision)
    model.language_model.requires_grad_(train_llm)
    trained = [
        name
        for name, flag in zip(COMPONENTS, (train_vision, train_projector, train_llm), strict=True)
        if flag
    ]
    frozen = [name for name in COMPONENTS if name not in trained]
    logger.info(
        "stage %s: training %s; frozen: %s",
        stage,
        ", ".join(trained) or "nothing",
        ", ".join(frozen) or "nothing",
    )


def parameter_table(model: nn.Module) -> str:
    """Total and trainable parameters per component (LoRA adapters counted under the LLM)."""
    rows = []
    base = unwrap_peft_model(model)
    for name in COMPONENTS:
        module = getattr(base, name)
        parameters = list(module.parameters())
        total = sum(_numel(p) for p in parameters)
        trainable = sum(_numel(p) for p in parameters if p.requires_grad)
        rows.append((name, total, trainable))
    total = sum(r[1] for r in rows)
    trainable = sum(r[2] for r in rows)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'parameters':>14}  {'trainable':>14}  {'share':>6}"]
    for name, count, train in [*rows, ("total", total, trainable)]:
        share = f"{100 * train / count:.1f}%" if count else "-"
        lines.append(f"{name:<{width}}  {count:>14,}  {train:>14,}  {share:>6}")
    return "\n".join(lines)


def _numel(parameter: nn.Parameter) -> int:
    # Under ZeRO-3 the local tensor is empty; ds_numel is the full size.
    return getattr(parameter, "ds_numel", parameter.numel())
