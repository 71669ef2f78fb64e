"""``python -m tokenpacker_llava.train`` / ``tokenpacker-llava train``: both training stages.

Reads top to bottom as the run: parse and validate the options (before anything heavy),
build tokenizer and model, load the stage-1 projector, freeze per stage, build the data,
train (resuming if asked), report skipped rows, save the final artifacts.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import transformers
from transformers import set_seed
from transformers.trainer_utils import unwrap_peft_model

from tokenpacker_llava.data.collate import PackedCollator, PaddedCollator
from tokenpacker_llava.data.dataset import SampleBuilder, StreamingLlavaDataset, build_dataset
from tokenpacker_llava.data.sources import parse_data_path
from tokenpacker_llava.data.templates import get_template
from tokenpacker_llava.training.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_arguments,
    resolved_config,
    validate,
)
from tokenpacker_llava.training.builder import (
    apply_lora,
    build_model,
    compile_parts,
    configure_image_mode,
    half_precision_frozen_parts,
    load_image_processor,
    load_tokenizer,
)
from tokenpacker_llava.training.checkpoints import PreemptionCallback, resolve_resume
from tokenpacker_llava.training.curves import CURVES_FILE, plot_training_curves, plottable
from tokenpacker_llava.training.projector_io import PROJECTOR_FILE, load_projector, save_projector
from tokenpacker_llava.training.stages import configure_stage, parameter_table
from tokenpacker_llava.training.trainer import TokenPackerTrainer

logger = logging.getLogger("tokenpacker_llava.train")

CONFIG_FILE = "training_config.json"
# EX_TEMPFAIL: stopped by a preemption signal after saving a checkpoint; run again to resume.
PREEMPTED_EXIT_CODE = 75


def setup_logging(training_args: TrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    transformers.utils.logging.set_verbosity(level if level != logging.INFO else logging.WARNING)


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    callbacks: list | None = None,
) -> TokenPackerTrainer:
    stage = model_args.stage
    # Sets up torch.distributed now: ZeRO-3 partitions parameters while the models load and
    # must see the real world size by then.
    logger.info(
        "device %s, process %d of %d",
        training_args.device,
        training_args.process_index,
        training_args.world_size,
    )
    if training_args.deepspeed:
        import deepspeed

        # zero.Init (ZeRO-3 loading) asks deepspeed.comm, not torch.distributed, for the world size.
        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
    logger.info("stage: %s (template %s)", stage, model_args.template)
    set_seed(training_args.seed)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)

    tokenizer, image_token_id = load_tokenizer(model_args, training_args)
    template = get_template(model_args.template, tokenizer)
    model = build_model(model_args, data_args, training_args, image_token_id)
    configure_image_mode(model.config, data_args, tokenizer)
    model.use_chunked_loss(training_args.loss_chunk_size)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)

    train_projector = stage == "pretrain" or not training_args.freeze_mm_mlp_adapter
    configure_stage(
        model,
        stage,
        train_projector=train_projector,
        train_vision=model_args.unfreeze_mm_vision_tower,
        train_llm=not training_args.lora_enable,
    )
    full_model = stage == "finetune" and not training_args.lora_enable
    half_precision_frozen_parts(model, training_args, saves_frozen_parts=full_model)
    if training_args.activation_checkpointing and training_args.activation_checkpointing_kwargs is None:
        # Non-reentrant checkpointing needs no inputs that require grad, so frozen embeddings
        # (stage 1, LoRA) work without hooks. (transformers 5's default too; said here so that it
        # does not depend on it. gradient_checkpointing_kwargs is the deprecated alias, already
        # folded into this field when the arguments were parsed.)
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}
    if training_args.lora_enable:
        model = apply_lora(model, training_args, train_projector)
    # After LoRA: peft copies the projector (modules_to_save), and a copy of a compiled module
    # would still call the original's compiled forward.
    compile_parts(model, training_args.compile_parts)
    logger.info("parameters:\n%s", parameter_table(model))

    base = unwrap_peft_model(model)
    builder = SampleBuilder(
        tokenizer,
        template,
        image_token_id=image_token_id,
        tokens_per_image=base.config.num_image_tokens,
        max_length=training_args.model_max_length,
        image_processor=load_image_processor(model_args),
        image_aspect_ratio=data_args.image_aspect_ratio,
        patch_num=base.config.patch_num,
        separator_ids=base.config.slice_separator_ids,
    )
    if builder.max_tokens_per_image >= training_args.model_max_length:
        logger.warning(
            "an image can take up to %d tokens (%s, patch_num %d) but --model_max_length is %d: samples with "
            "the largest grids will be too long",
            builder.max_tokens_per_image,
            data_args.image_aspect_ratio,
            data_args.patch_num,
            training_args.model_max_length,
        )
    sources = parse_data_path(data_args.data_path, data_args.image_folder)
    if data_args.streaming:
        dataset = StreamingLlavaDataset(
            sources,
            builder,
            on_bad_sample=data_args.on_bad_sample,
            seed=training_args.seed,
            shuffle_buffer=data_args.shuffle_buffer,
        )
        # accelerate's default for a stream reads it on rank 0 only and sends each rank a slice of
        # one concatenated batch, which samples of different lengths cannot form: every rank reads
        # the stream instead and keeps its own batches (see StreamingLlavaDataset).
        training_args.accelerator_config.dispatch_batches = False
    else:
        dataset = build_dataset(sources, builder, on_bad_sample=data_args.on_bad_sample)
    eval_dataset = (
        build_dataset(
            parse_data_path(data_args.eval_data_path, data_args.image_folder),
            builder,
            on_bad_sample=data_args.on_bad_sample,
        )
        if data_args.eval_data_path
        else None
    )
    # Packed rows carry their sample boundaries (cu_seq_lens, max_length) so flash-attn's varlen
    # kernel and sdpa_varlen read them directly instead of deriving them from position_ids.
    collator = (
        PackedCollator(return_flash_attn_kwargs=True)
        if data_args.packing
        else PaddedCollator(tokenizer.pad_token_id)
    )

    # Samples carry metadata (row, id, skipped rows) the collator consumes: keep every column.
    training_args.remove_unused_columns = False
    # Evaluation measures the loss only (no metric needs logits, which the chunked loss skips).
    training_args.prediction_loss_only = True
    # The final folder is pushed once, complete (remote code, card), by save_final rather
    # than by the Trainer at every save.
    push_to = (
        (training_args.hub_model_id or Path(training_args.output_dir).name)
        if training_args.push_to_hub
        else None
    )
    training_args.push_to_hub = False
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        config = resolved_config(model_args, data_args, training_args)
        (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))

    preemption = PreemptionCallback()
    trainer = TokenPackerTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[preemption, *(callbacks or [])],
        image_token_id=image_token_id,
        trainable_only_checkpoints=stage == "pretrain",
    )
    result = trainer.train(resume_from_checkpoint=resume)
    if preemption.stopped_by and trainer.state.global_step < trainer.state.max_steps:
        # Not the end of training: no final model, projector file, evaluation or push, which a
        # next stage or job dependency would take for the finished run.
        trainer.preempted_by = preemption.stopped_by
        trainer.report_skipped()
        logger.warning(
            "stopped by %s at step %d of %d after saving checkpoint-%d; run again with "
            "--resume_from_checkpoint auto to continue (exit code %d)",
            preemption.stopped_by,
            trainer.state.global_step,
            trainer.state.max_steps,
            trainer.state.global_step,
            PREEMPTED_EXIT_CODE,
        )
        return trainer
    trainer.save_metrics("train", result.metrics)
    if eval_dataset is not None:
        trainer.save_metrics("eval", final_evaluation(trainer))
    trainer.report_skipped()
    save_final(trainer, model_args, data_args, training_args, push_to)
    return trainer


def final_evaluation(trainer: TokenPackerTrainer) -> dict[str, float]:
    """The evaluation metrics at the last step: logged already if --eval_strategy ended there,
    else measured now."""
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {key: value for key, value in entry.items() if key.startswith("eval_")}
    return trainer.evaluate()


def save_final(
    trainer: TokenPackerTrainer,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    push_to: str | None,
) -> None:
    """Stage 1: the projector file. Stage 2: a model folder that loads with this package or,
    via the bundled remote code, with transformers alone; LoRA runs keep the adapter."""
    from tokenpacker_llava.export import push_folder, write_model_card, write_remote_code

    output_dir = Path(training_args.output_dir)
    trainer.save_model(str(output_dir))
    save_projector(trainer.model, output_dir / PROJECTOR_FILE, write=training_args.should_save)
    trainer.save_state()
    if training_args.should_save and not plottable(trainer.state.log_history):
        logger.info(
            "no training metrics were logged (--logging_steps %s): no curves", training_args.logging_steps
        )
    elif training_args.should_save:
        curves = plot_training_curves(
            {output_dir.name: trainer.state.log_history},
            output_dir / CURVES_FILE,
            title=f"{model_args.stage}: {output_dir}",
        )
        logger.info("training curves: %s", curves)
    full_model = model_args.stage == "finetune" and not training_args.lora_enable
    if training_args.should_save and full_model:
        load_image_processor(model_args).save_pretrained(output_dir)
        write_remote_code(output_dir)
        write_model_card(
            output_dir,
            training_config=json.loads((output_dir / CONFIG_FILE).read_text()),
            base_models={
                "language_model": model_args.model_name_or_path,
                "vision_tower": model_args.vision_tower or "",
            },
            # Hub dataset ids only (weights and local files left out).
            datasets=[
                source.path
                for source in parse_data_path(data_args.data_path)
                if not source.is_record_file and not Path(source.path).exists()
            ],
            repo_id=push_to,
        )
    trainer.accelerator.wait_for_everyone()
    logger.info("saved the final %s artifacts to %s", model_args.stage, output_dir)
    if push_to and trainer.is_world_process_zero():
        url = push_folder(
            output_dir, push_to, token=training_args.hub_token, private=bool(training_args.hub_private_repo)
        )
        logger.info("pushed %s to %s", output_dir, url)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    validate(model_args, data_args, training_args)
    setup_logging(training_args)
    trainer = run(model_args, data_args, training_args)
    return PREEMPTED_EXIT_CODE if trainer.preempted_by else 0


if __name__ == "__main__":
    sys.exit(main())
