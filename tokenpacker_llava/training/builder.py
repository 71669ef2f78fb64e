"""Building what a training run needs: tokenizer, model (from parts or a saved folder), LoRA."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.trainer_utils import unwrap_peft_model

from tokenpacker_llava.models.attention import resolve_attn_implementation
from tokenpacker_llava.models.configuration import TokenPackerLlavaConfig
from tokenpacker_llava.models.modeling import TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.tokenization import ensure_image_token, slice_separator_ids
from tokenpacker_llava.training.arguments import DataArguments, ModelArguments, TrainingArguments
from tokenpacker_llava.training.stages import COMPONENTS

logger = logging.getLogger(__name__)


def is_tokenpacker_folder(path: str, trust_remote_code: bool = False) -> bool:
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("model_type") == TokenPackerLlavaConfig.model_type
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type == (
            TokenPackerLlavaConfig.model_type
        )
    except (OSError, ValueError):
        return False


def load_tokenizer(
    model_args: ModelArguments, training_args: TrainingArguments
) -> tuple[PreTrainedTokenizerBase, int]:
    """The LLM's tokenizer (right padding, pad = unk as LLaVA) with ``<image>`` added."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        model_max_length=training_args.model_max_length,
        padding_side="right",
        trust_remote_code=model_args.trust_remote_code,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("tokenizer has no pad token; using %r", tokenizer.pad_token)
    return tokenizer, ensure_image_token(tokenizer)


def half_precision_frozen_parts(
    model: TokenPackerLlavaForConditionalGeneration,
    training_args: TrainingArguments,
    *,
    saves_frozen_parts: bool,
) -> list[str]:
    """Cast the parts that neither train nor get saved to the ``--bf16``/``--fp16`` dtype.

    Without DeepSpeed the weights load in fp32 (``load_dtype``) and compute runs under autocast.
    A frozen part gains nothing from fp32 weights: autocast casts them down for every matmul at
    every step. Cast once, it takes half the memory (a 7B LLM: 13.5 instead of 27 GB, what lets a
    LoRA run fit one GPU) and no per-step casts. Parts the run saves (the frozen tower of a full
    stage-2 model) keep their dtype, as do quantized (QLoRA) LLMs. Returns the parts cast.
    """
    if training_args.deepspeed or not (training_args.bf16 or training_args.fp16) or saves_frozen_parts:
        return []
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16
    cast = []
    for name in COMPONENTS:
        if name == "language_model" and training_args.bits != 16:
            continue
        module = getattr(model, name)
        if not any(parameter.requires_grad for parameter in module.parameters()):
            module.to(dtype)
            cast.append(name)
    if cast:
        logger.info("frozen and not saved: %s cast to %s", ", ".join(cast), dtype)
    return cast


def load_dtype(training_args: TrainingArguments) -> torch.dtype:
    # Half-precision weights only where DeepSpeed keeps fp32 master copies; otherwise fp32
    # weights under autocast, so the optimizer never updates bf16 parameters directly (frozen,
    # unsaved parts are cast down afterwards: half_precision_frozen_parts).
    if training_args.deepspeed and training_args.bf16:
        return torch.bfloat16
    if training_args.deepspeed and training_args.fp16:
        return torch.float16
    return torch.float32


def build_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    image_token_id: int,
) -> TokenPackerLlavaForConditionalGeneration:
    attn = resolve_attn_implementation(model_args.attn_implementation)
    dtype = load_dtype(training_args)
    if is_tokenpacker_folder(model_args.model_name_or_path, model_args.trust_remote_code):
        logger.info("continuing from the TokenPacker-LLaVA model %s", model_args.model_name_or_path)
        model = TokenPackerLlavaForConditionalGeneration.from_pretrained(
            model_args.model_name_or_path, dtype=dtype, attn_implementation=attn
        )
        if model.config.image_token_id != image_token_id:
            raise ValueError(
                f"the model's image_token_id {model.config.image_token_id} differs from the tokenizer's "
                f"<image> id {image_token_id}"
            )
        return model
    if model_args.vision_tower is None:
        raise ValueError(f"{model_args.model_name_or_path} is a plain LLM: pass --vision_tower")
    logger.info(
        "building from LLM %s and vision tower %s", model_args.model_name_or_path, model_args.vision_tower
    )
    return TokenPackerLlavaForConditionalGeneration.from_pretrained_parts(
        model_args.model_name_or_path,
        model_args.vision_tower,
        image_token_id=image_token_id,
        projector_type=model_args.mm_projector_type,
        scale_factor=model_args.scale_factor,
        vision_feature_layer=model_args.mm_vision_select_layer,
        multi_level_layers=model_args.multi_level_layers,
        image_aspect_ratio=data_args.image_aspect_ratio,
        patch_num=data_args.patch_num,
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=model_args.trust_remote_code,
        llm_quantization_config=quantization_config(training_args),
    )


def configure_image_mode(
    config: TokenPackerLlavaConfig, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Record in the model config how this run feeds images, so the saved model is used the same way.

    Slice mode also stores the ``,`` and newline separator ids. A config that already has them
    (continuing from a trained or converted slice-mode model) keeps them: the model was trained
    with those embeddings between its tiles.
    """
    for key, value in (
        ("image_aspect_ratio", data_args.image_aspect_ratio),
        ("patch_num", data_args.patch_num),
    ):
        if getattr(config, key) != value:
            logger.info(
                "model config %s: %r -> %r (this run's data options)", key, getattr(config, key), value
            )
            setattr(config, key, value)
    if data_args.image_aspect_ratio != "slice":
        return
    if config.slice_separator_ids is None:
        config.slice_separator_ids = list(slice_separator_ids(tokenizer))
        logger.info(
            "slice mode: tile separator ',' = id %d, row separator newline = id %d",
            *config.slice_separator_ids,
        )
    else:
        logger.info(
            "slice mode: keeping the model's separator ids %s (',' and newline), which it was trained with",
            config.slice_separator_ids,
        )


def quantization_config(training_args: TrainingArguments):
    """bitsandbytes settings of LLaVA's QLoRA (``--bits 4/8``), or None for 16-bit training."""
    if training_args.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=training_args.bits == 4,
        load_in_8bit=training_args.bits == 8,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=training_args.double_quant,
        bnb_4bit_quant_type=training_args.quant_type,
        llm_int8_skip_modules=["vision_tower", "projector"],
    )


def load_image_processor(model_args: ModelArguments):
    source = model_args.vision_tower or model_args.model_name_or_path
    return AutoImageProcessor.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)


def compile_parts(model: nn.Module, parts: list[str]) -> None:
    """``torch.compile`` the named parts of the (possibly LoRA-wrapped) model in place.

    ``nn.Module.compile`` keeps the module, its parameters and state-dict keys, so checkpoints
    and the saved model are unchanged. Shapes are specialized first and made dynamic on the first
    change (the number of images varies from batch to batch), so a run compiles about twice.
    """
    base = unwrap_peft_model(model)
    for part in parts:
        getattr(base, part).compile()
        logger.info("torch.compile: %s (compiled on its first calls)", part)


def lora_target_pattern(model: TokenPackerLlavaForConditionalGeneration) -> str:
    """A regex matching every Linear layer of the LLM except its output head (as LLaVA)."""
    head = model.language_model.get_output_embeddings()
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.language_model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
        }
    )
    return rf"^language_model\..*\.({'|'.join(map(re.escape, names))})$"


def apply_lora(
    model: TokenPackerLlavaForConditionalGeneration, training_args: TrainingArguments, train_projector: bool
):
    """Wrap ``model`` with peft LoRA adapters on the LLM; the projector is trained fully."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if training_args.bits != 16:
        model.language_model = prepare_model_for_kbit_training(
            model.language_model, use_gradient_checkpointing=training_args.gradient_checkpointing
        )

    config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        target_modules=lora_target_pattern(model),
        modules_to_save=["projector"] if train_projector else None,
    )
    logger.info("LoRA r=%d alpha=%d on %s", config.r, config.lora_alpha, config.target_modules)
    return get_peft_model(model, config)
