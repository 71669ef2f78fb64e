"""``tokenpacker-llava merge-lora``: fold a LoRA run's adapters into a standalone model folder.

The run's ``training_config.json`` says which LLM and vision tower the adapters were trained
on; the base is rebuilt from them exactly as training built it, the adapter (with its fully
trained projector copy) is loaded, merged, and the result saved with tokenizer and image
processor like any stage-2 model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from tokenpacker_llava.training.arguments import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def merge_lora(run_dir: str | Path, output_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    from peft import PeftModel

    from tokenpacker_llava.training.builder import build_model, load_image_processor, load_tokenizer

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config_file = run_dir / "training_config.json"
    if not (run_dir / "adapter_config.json").is_file() or not config_file.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a LoRA run folder (needs adapter_config.json and training_config.json)"
        )
    config = json.loads(config_file.read_text())
    model_args = ModelArguments(**{k: v for k, v in config["model"].items()})
    data_args = DataArguments(**config["data"])
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        model_max_length=config["training"]["model_max_length"],
        use_cpu=True,
        report_to="none",
    )
    tokenizer, image_token_id = load_tokenizer(model_args, training_args)
    model_args.pretrain_mm_mlp_adapter = None  # the adapter carries the trained projector
    base = build_model(model_args, data_args, training_args, image_token_id)
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    if dtype is not None:
        merged.to(dtype)
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    load_image_processor(model_args).save_pretrained(output_dir)
    logger.info("merged %s into %s", run_dir, output_dir)
    return output_dir
