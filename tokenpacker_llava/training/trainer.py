"""``TokenPackerTrainer``: transformers' Trainer plus what multimodal training needs.

- the LLaVA length-and-modality grouped sampler (``group_by_modality_length``);
- parameter groups with their own learning rates (``mm_projector_lr``, ``mm_vision_tower_lr``);
- the bad rows the dataset skipped and the rows it shortened to fit the length, counted across
  data-loader workers and ranks, and reported;
- tokens/s (of training: evaluation and checkpoint time left out) and the visual-token share in
  the logs;
- checkpoints that are marked complete only when written, rotated only among complete ones,
  each with the small ``projector.safetensors`` for the next stage; in stage 1 (frozen
  backbones) a checkpoint holds the trainable projector instead of the whole model, with or
  without DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedSchedulerWrapper
from torch import nn
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_pt_utils import get_parameter_names

from tokenpacker_llava.data.sampler import ModalityLengthGroupedSampler
from tokenpacker_llava.training.checkpoints import mark_complete, rotate, unmark_complete
from tokenpacker_llava.training.projector_io import PROJECTOR_FILE, load_projector, save_projector

logger = logging.getLogger(__name__)

TRAINABLE_ONLY_MARKER = "trainable_only"
SHORTENED_SHOWN = 20  # rows named in the end-of-training report of shortened rows


class TokenPackerTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        image_token_id: int | None = None,
        trainable_only_checkpoints: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.image_token_id = image_token_id
        self.trainable_only_checkpoints = trainable_only_checkpoints
        self.preempted_by: str | None = None  # set by train.run when a signal stopped training
        self._grouped_sampler: ModalityLengthGroupedSampler | None = None
        self.skipped_samples: set[str] = set()
        self.shortened_samples: set[str] = set()
        self._tokens = 0
        self._visual_tokens = 0
        self._window_start = time.perf_counter()
        if trainable_only_checkpoints and self.is_deepspeed_enabled:
            # transformers resumes DeepSpeed checkpoints with a strict module load; the frozen
            # parameters are absent from ours (see _save_optimizer_and_scheduler) and stay as
            # the run loaded them from their pretrained sources.
            self.model.register_load_state_dict_post_hook(_frozen_parameters_may_be_missing)

    # -- data -----------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_modality_length:
            self._grouped_sampler = ModalityLengthGroupedSampler(
                dataset.modality_lengths,
                batch_size=self.args.train_batch_size,
                # LLaVA groups over everything that forms one optimizer step.
                world_size=self.args.world_size * self.args.gradient_accumulation_steps,
                seed=self.args.seed,
            )
            return self._grouped_sampler
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        # On several ranks, a data loader resumed mid-epoch (accelerate's skip_first_batches) does
        # not pass set_epoch on to the sampler: without this, epoch >= 1 would replay epoch 0's order.
        if self._grouped_sampler is not None:
            self._grouped_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    # -- optimizer ------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(get_parameter_names(model, [nn.LayerNorm], ["bias", "layernorm", "rmsnorm", "norm"]))
        special = {"projector": self.args.mm_projector_lr, "vision_tower": self.args.mm_vision_tower_lr}
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            part = next((key for key, lr in special.items() if lr is not None and f"{key}." in name), "rest")
            groups.setdefault((part, name in decay), []).append(parameter)
        param_groups = []
        for (part, with_decay), parameters in groups.items():
            group = {"params": parameters, "weight_decay": self.args.weight_decay if with_decay else 0.0}
            if part != "rest":
                group["lr"] = special[part]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        if self._offloads_optimizer():
            optimizer_cls, optimizer_kwargs = self._cpu_adam(optimizer_kwargs)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        if self.args.should_log:
            logger.info(
                "optimizer %s, parameter groups: %s",
                optimizer_cls.__name__,
                "; ".join(
                    f"{part}{'' if with_decay else ' (no decay)'}: {len(parameters)} tensors, lr "
                    f"{special[part] if part != 'rest' else self.args.learning_rate:g}"
                    for (part, with_decay), parameters in groups.items()
                ),
            )
        return self.optimizer

    def _offloads_optimizer(self) -> bool:
        config = getattr(self.args, "hf_deepspeed_config", None)
        return config is not None and config.get_value("zero_optimization.offload_optimizer.device") in (
            "cpu",
            "nvme",
        )

    def _cpu_adam(self, optimizer_kwargs: dict[str, Any]) -> tuple[type, dict[str, Any]]:
        """DeepSpeed's CPU AdamW for ZeRO optimizer offload (DeepSpeed refuses a PyTorch optimizer
        there), built here rather than from a DeepSpeed ``optimizer`` block so that it keeps the
        parameter groups and their learning rates."""
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if "adamw" not in optim:
            raise ValueError(
                f"ZeRO optimizer offload runs AdamW on the CPU (DeepSpeedCPUAdam); --optim {optim} "
                "cannot be offloaded"
            )
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        kept = {key: optimizer_kwargs[key] for key in ("lr", "betas", "eps") if key in optimizer_kwargs}
        return DeepSpeedCPUAdam, {**kept, "adamw_mode": True}

    # -- loss and logging -----------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.skipped_samples.update(inputs.pop("skipped_samples", ()))
        self.shortened_samples.update(inputs.pop("shortened_samples", ()))
        if model.training:
            self._count_tokens(inputs)
        elif self.args.prediction_loss_only:
            # Evaluation keeps only the loss: the chunked loss (when set) skips the logits.
            inputs = {**inputs, "loss_only": True}
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            # tokens/s measures training: the evaluation's time is not part of the window.
            self._window_start += time.perf_counter() - started

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        input_ids = inputs["input_ids"]
        real = (
            inputs["attention_mask"].bool()
            if "attention_mask" in inputs
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        self._tokens += int(real.sum())
        if self.image_token_id is not None:
            self._visual_tokens += int(((input_ids == self.image_token_id) & real).sum())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            counts = torch.tensor(
                [self._tokens, self._visual_tokens], dtype=torch.float64, device=self.args.device
            )
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(counts)
            elapsed = max(now - self._window_start, 1e-9)
            logs["tokens_per_second"] = round(counts[0].item() / elapsed, 1)
            logs["visual_token_share"] = round(counts[1].item() / max(counts[0].item(), 1.0), 4)
            logs["skipped_samples"] = len(self.skipped_samples)
            logs["shortened_samples"] = len(self.shortened_samples)
            self._tokens = self._visual_tokens = 0
            self._window_start = now
        super().log(logs, start_time)

    # -- checkpoints ----------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        started = time.perf_counter()
        try:
            self._save_complete_checkpoint(model, trial)
        finally:
            self._window_start += time.perf_counter() - started  # as for evaluate

    def _save_complete_checkpoint(self, model, trial) -> None:
        # Rotation is ours: it must only ever delete complete checkpoints, after the new one is.
        limit = self.args.save_total_limit
        output_dir = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            unmark_complete(output_dir)  # a folder of the same step from before is rewritten now
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        save_projector(self.model, output_dir / PROJECTOR_FILE, write=self.args.should_save)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(output_dir)
            best = self.state.best_model_checkpoint
            rotate(output_dir.parent, limit, protect=[output_dir, *([Path(best)] if best else [])])
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.trainable_only_checkpoints:
            return super().save_model(output_dir, _internal_call)
        # Stage 1 saves the projector alone: no full state dict first (under ZeRO-3 transformers
        # would gather the whole 16-bit model, 14 GB at 7B, only for _save to drop it).
        self._save(output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.trainable_only_checkpoints:
            return super()._save(output_dir, state_dict)
        # Stage 1: the frozen vision tower and LLM come from their pretrained sources on resume.
        output_dir = output_dir or self.args.output_dir
        # Called on every rank (the ZeRO-3 gather needs them all); one of them writes.
        save_projector(self.model, Path(output_dir) / PROJECTOR_FILE, write=self.args.should_save)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.model.config.save_pretrained(output_dir)
        Path(output_dir, TRAINABLE_ONLY_MARKER).write_text("projector only; see projector.safetensors\n")
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not (self.trainable_only_checkpoints and self.is_deepspeed_enabled):
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed's own checkpoint would hold the frozen tower and LLM twice (module states and,
        # under ZeRO-2/3, the frozen fragments): about 27 GB per 7B stage-1 checkpoint instead of
        # the projector and its optimizer state (0.5 GB).
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if Path(resume_from_checkpoint, TRAINABLE_ONLY_MARKER).is_file() and not self.is_deepspeed_enabled:
            load_projector(model or self.model, Path(resume_from_checkpoint) / PROJECTOR_FILE)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def report_skipped(self) -> None:
        """Log every bad row skipped and every row shortened on any rank (each rank saw only its
        own share)."""
        self.skipped_samples = _union_over_ranks(self.skipped_samples)
        self.shortened_samples = _union_over_ranks(self.shortened_samples)
        if not self.args.should_log:
            return
        if self.shortened_samples:
            logger.warning(
                "%d row(s) were shortened to fit --model_max_length %d (turns dropped or the last answer cut):",
                len(self.shortened_samples),
                self.args.model_max_length,
            )
            # Trained on (unlike skipped rows), and possibly many: the first few name the pattern,
            # `tokenpacker-llava data check` counts them all.
            shown = sorted(self.shortened_samples)[:SHORTENED_SHOWN]
            for description in shown:
                logger.warning("  %s", description)
            if len(self.shortened_samples) > len(shown):
                logger.warning("  ... and %d more", len(self.shortened_samples) - len(shown))
        if not self.skipped_samples:
            logger.info("no bad samples were skipped")
            return
        logger.warning("%d bad sample(s) were skipped during training:", len(self.skipped_samples))
        for description in sorted(self.skipped_samples):
            logger.warning("  %s", description)


def _union_over_ranks(items: set[str]) -> set[str]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[set[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, items)
        return set().union(*(part or set() for part in gathered))
    return set(items)


def _frozen_parameters_may_be_missing(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: a missing key is no error when it names a frozen parameter."""
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if key not in frozen]
