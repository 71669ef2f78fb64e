"""``tokenpacker-llava merge-lora``: fold a LoRA run's adapters into a standalone model folder.

The run's ``training_config.json`` says which LLM and vision tower the adapters were trained
on; the base is rebuilt from them exactly as training built it, with the run's image mode in its
config (in slice mode the separator ids inference needs) and the projector the run ended with
(its ``projector.safetensors``: trained through the adapter's ``modules_to_save`` copy, or frozen,
in which case the adapter holds no copy). The adapter is then loaded, merged, and the result saved
with tokenizer and image processor like any stage-2 model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tokenpacker_llava.training.arguments import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)

RUN_FILES = ("adapter_config.json", "training_config.json", "projector.safetensors")


def merge_lora(run_dir: str | Path, output_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    from peft import PeftModel

    from tokenpacker_llava.training.builder import (
        build_model,
        configure_image_mode,
        load_image_processor,
        load_tokenizer,
    )
    from tokenpacker_llava.training.projector_io import PROJECTOR_FILE, load_projector

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished LoRA run folder (needs {', '.join(RUN_FILES)}; "
            f"missing {', '.join(missing)})"
        )
    config = json.loads((run_dir / "training_config.json").read_text())
    model_args = ModelArguments(**{k: v for k, v in config["model"].items()})
    data_args = DataArguments(**config["data"])
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        model_max_length=config["training"]["model_max_length"],
        use_cpu=True,
        report_to="none",
    )
    tokenizer, image_token_id = load_tokenizer(model_args, training_args)
    model_args.pretrain_mm_mlp_adapter = None  # replaced by the projector the run ended with, below
    base = build_model(model_args, data_args, training_args, image_token_id)
    configure_image_mode(base.config, data_args, tokenizer)  # as training did: slice separator ids
    load_projector(base, run_dir / PROJECTOR_FILE)
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    if dtype is not None:
        merged.to(dtype)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    load_image_processor(model_args).save_pretrained(output_dir)
    # The run's options (its conversation template among them), which inference reads as it does
    # from a full stage-2 folder.
    (output_dir / "training_config.json").write_text((run_dir / "training_config.json").read_text())
    logger.info("merged %s into %s", run_dir, output_dir)
    return output_dir
