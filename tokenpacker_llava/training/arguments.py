"""Command-line and config-file arguments of ``tokenpacker-llava train``, with LLaVA's names.

Three dataclasses parsed by ``HfArgumentParser``: ``ModelArguments``, ``DataArguments`` and
``TrainingArguments`` (transformers' own plus LLaVA's extras). ``--config file.yaml|json``
supplies defaults that the command line overrides. ``validate`` rejects unknown and
contradictory settings before anything heavy is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import transformers
import yaml
from transformers import HfArgumentParser

from tokenpacker_llava.data.sources import parse_data_path
from tokenpacker_llava.models.attention import ATTENTION_CHOICES
from tokenpacker_llava.models.configuration import IMAGE_ASPECT_RATIOS, SLICE_PATCH_NUMS
from tokenpacker_llava.models.projectors import PROJECTORS, TokenPreservingProjector

logger = logging.getLogger(__name__)

# The model parts `--compile_parts` may compile (the LLM is left to the Trainer's --torch_compile).
COMPILABLE_PARTS = ("vision_tower", "projector")

# LLaVA's `--version` names -> our template names (exact table, no substring matching).
LLAVA_VERSIONS = {
    "plain": "plain",
    "v1": "vicuna_v1",
    "vicuna_v1": "vicuna_v1",
    "llava_llama_2": "llama_2",
    "llama_2": "llama_2",
    "llama_3": "llama_3",
    "mistral_instruct": "mistral",
    "mistral": "mistral",
    "qwen_2": "chatml",
    "chatml": "chatml",
    "tokenizer": "tokenizer",
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "The LLM (hub id or folder), or a TokenPacker-LLaVA folder to continue from."}
    )
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP/SigLIP hub id or folder."})
    mm_projector_type: str = field(default="tokenpacker", metadata={"help": f"One of {PROJECTORS.names()}."})
    scale_factor: int | None = field(
        default=None, metadata={"help": "Projector downsampling (tokenpacker: 2)."}
    )
    mm_vision_select_layer: int = field(
        default=-2, metadata={"help": "Hidden-state index of the query layer."}
    )
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "Only 'patch' (CLS dropped)."})
    mm_multi_level_layers: str | None = field(
        default=None, metadata={"help": "Comma-separated hidden-state indices (default 12,16,22,23 scaled)."}
    )
    version: str = field(
        default="vicuna_v1", metadata={"help": f"Conversation template: {sorted(LLAVA_VERSIONS)}."}
    )
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Stage 1: train only the projector."})
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={"help": "Stage-1 projector file (projector.safetensors) to start stage 2 from."},
    )
    unfreeze_mm_vision_tower: bool = field(
        default=False, metadata={"help": "Stage 2: also train the vision tower."}
    )
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "Not supported (as TokenPacker)."})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "Not supported (as TokenPacker)."})
    attn_implementation: str = field(default="auto", metadata={"help": f"One of {ATTENTION_CHOICES}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from model repositories."})

    @property
    def multi_level_layers(self) -> list[int] | None:
        if self.mm_multi_level_layers is None:
            return None
        return [int(part) for part in self.mm_multi_level_layers.split(",") if part.strip()]

    @property
    def template(self) -> str:
        return LLAVA_VERSIONS[self.version]

    @property
    def stage(self) -> str:
        return "pretrain" if self.tune_mm_mlp_adapter else "finetune"


@dataclass
class DataArguments:
    data_path: list[str] = field(
        metadata={"help": "LLaVA .json/.jsonl files or dataset ids; `path:weight` sets a mixing weight."}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the image paths are relative to."}
    )
    image_aspect_ratio: str = field(
        default="pad",
        metadata={"help": "pad (LLaVA-1.5), resize, or slice (TokenPacker-HD: tiles plus a global view)."},
    )
    patch_num: int = field(
        default=9, metadata={"help": f"slice mode: the most tiles per image, one of {SLICE_PATCH_NUMS}."}
    )
    eval_data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Held-out LLaVA data (as --data_path, without weights) whose loss is evaluated at "
            "--eval_strategy and once at the end of training."
        },
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training data instead of loading it."}
    )
    shuffle_buffer: int = field(
        default=10000,
        metadata={
            "help": "--streaming: draw rows at random from a buffer of this many (reshuffled every "
            "epoch); 0 reads the stream in file order."
        },
    )
    on_bad_sample: str = field(
        default="error", metadata={"help": "error: stop at a bad row; skip: log and count."}
    )
    packing: bool = field(
        default=False, metadata={"help": "Padding-free packing of each batch into one row."}
    )
    lazy_preprocess: bool = field(default=True, metadata={"help": "Accepted for LLaVA scripts; always lazy."})
    is_multimodal: bool = field(default=True, metadata={"help": "Accepted for LLaVA scripts."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(
        default=2048, metadata={"help": "Tokens per sample, visual tokens included."}
    )
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector."})
    mm_vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower."}
    )
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "LLaVA's length+modality grouping."}
    )
    freeze_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Stage 2: keep the projector frozen."}
    )
    lora_enable: bool = field(default=False, metadata={"help": "Stage 2 with LoRA on the LLM (peft)."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    bits: int = field(default=16, metadata={"help": "16 (no quantization), or 8/4 for QLoRA (CUDA)."})
    double_quant: bool = True
    quant_type: str = "nf4"
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Compute the loss from the LLM's hidden states on target positions only, this many "
            "tokens at a time, never holding the full logits (e.g. 2048); unset: the LLM's own loss."
        },
    )
    compile_parts: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"torch.compile these parts in place, any of {COMPILABLE_PARTS} (same weights and "
            "checkpoint keys); not under ZeRO-3."
        },
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "LLaVA's name: warmup as a fraction of the steps (sets --warmup_steps)."},
    )

    def __post_init__(self) -> None:
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            # transformers 5 reads a fractional warmup_steps as a ratio of the total steps.
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return values


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``argv`` (``--config FILE`` first supplies defaults); unknown options are errors."""
    argv = list(argv)
    file_values: dict[str, Any] = {}
    if "--config" in argv:
        position = argv.index("--config")
        if position + 1 >= len(argv):
            raise ValueError("--config needs a file path")
        file_values = load_config_file(argv[position + 1])
        del argv[position : position + 2]
    parser = build_parser()
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) in the config file: {', '.join(unknown)}")
    # Required fields given in the file must not be demanded again on the command line.
    for action in parser._actions:
        if action.dest in file_values:
            action.required = False
    parser.set_defaults(**file_values)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


def validate(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Reject contradictory or unsupported settings, each with the option names to fix."""
    errors: list[str] = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            errors.append(message)

    check(
        model_args.version in LLAVA_VERSIONS,
        f"--version {model_args.version!r}: choose from {sorted(LLAVA_VERSIONS)}",
    )
    check(
        model_args.mm_projector_type in PROJECTORS,
        f"--mm_projector_type {model_args.mm_projector_type!r}: choose from {PROJECTORS.names()}",
    )
    if model_args.mm_projector_type in PROJECTORS and model_args.scale_factor not in (None, 1):
        check(
            not issubclass(PROJECTORS.get(model_args.mm_projector_type), TokenPreservingProjector),
            f"--scale_factor {model_args.scale_factor} does not apply to --mm_projector_type {model_args.mm_projector_type}",
        )
    check(
        model_args.mm_vision_select_feature == "patch",
        "--mm_vision_select_feature: only 'patch' is supported",
    )
    check(
        not (model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token),
        "--mm_use_im_start_end / --mm_use_im_patch_token are not supported (TokenPacker uses neither)",
    )
    check(
        model_args.attn_implementation in ATTENTION_CHOICES,
        f"--attn_implementation: choose from {ATTENTION_CHOICES}",
    )
    if model_args.mm_multi_level_layers is not None:
        try:
            model_args.multi_level_layers  # noqa: B018
        except ValueError:
            errors.append(
                f"--mm_multi_level_layers {model_args.mm_multi_level_layers!r}: expected e.g. 12,16,22,23"
            )
    stage1 = model_args.tune_mm_mlp_adapter
    check(
        not (stage1 and training_args.lora_enable),
        "--tune_mm_mlp_adapter (stage 1) and --lora_enable contradict",
    )
    check(
        not (stage1 and model_args.unfreeze_mm_vision_tower),
        "--tune_mm_mlp_adapter and --unfreeze_mm_vision_tower contradict",
    )
    check(
        not (stage1 and training_args.freeze_mm_mlp_adapter),
        "--tune_mm_mlp_adapter and --freeze_mm_mlp_adapter contradict",
    )
    check(
        training_args.mm_vision_tower_lr is None or model_args.unfreeze_mm_vision_tower,
        "--mm_vision_tower_lr needs --unfreeze_mm_vision_tower",
    )
    check(
        not (training_args.lora_enable and model_args.unfreeze_mm_vision_tower),
        "--lora_enable with --unfreeze_mm_vision_tower: the LoRA model trains and saves only the adapters "
        "and the projector; train the tower in a full stage-2 run",
    )
    check(
        training_args.label_smoothing_factor == 0,
        "--label_smoothing_factor: the Trainer's label smoother does not shift a multimodal model's labels "
        "(it would train each position on its own token); not supported",
    )
    check(
        not (training_args.save_only_model and training_args.resume_from_checkpoint is not None),
        "--save_only_model checkpoints hold no optimizer, scheduler or RNG state, so resuming from them "
        "is not exact: drop --save_only_model or --resume_from_checkpoint (scripts: RESUME=)",
    )
    check(
        not (stage1 and training_args.load_best_model_at_end),
        "--load_best_model_at_end: stage-1 checkpoints hold the projector only; pick a checkpoint's "
        "projector.safetensors by its eval loss instead",
    )
    check(
        not training_args.push_to_hub or not (stage1 or training_args.lora_enable),
        "--push_to_hub uploads a full stage-2 model folder: for LoRA, merge first (tokenpacker-llava "
        "merge-lora) and upload with `tokenpacker-llava push`; stage 1 has only a projector",
    )
    check(training_args.bits in (4, 8, 16), f"--bits {training_args.bits}: choose 16, 8 or 4")
    if training_args.bits != 16:
        import importlib.util

        import torch

        check(training_args.lora_enable, f"--bits {training_args.bits} (QLoRA) needs --lora_enable")
        check(
            torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
            f"--bits {training_args.bits} (QLoRA) needs a CUDA device and the bitsandbytes package",
        )
    check(training_args.lora_bias in ("none", "all", "lora_only"), "--lora_bias: none, all or lora_only")
    check(
        data_args.image_aspect_ratio in IMAGE_ASPECT_RATIOS,
        f"--image_aspect_ratio {data_args.image_aspect_ratio!r}: choose from {IMAGE_ASPECT_RATIOS}",
    )
    check(
        data_args.patch_num in SLICE_PATCH_NUMS,
        f"--patch_num {data_args.patch_num}: choose from {SLICE_PATCH_NUMS} (the published slice grids)",
    )
    check(data_args.on_bad_sample in ("error", "skip"), "--on_bad_sample: error or skip")
    check(
        not (data_args.streaming and training_args.group_by_modality_length),
        "--streaming and --group_by_modality_length contradict (grouping needs every length up front)",
    )
    check(
        not (data_args.streaming and training_args.max_steps <= 0),
        "--streaming needs --max_steps (the stream has no length)",
    )
    check(training_args.model_max_length > 0, "--model_max_length must be positive")
    check(data_args.shuffle_buffer >= 0, f"--shuffle_buffer {data_args.shuffle_buffer}: must be >= 0")
    unknown_parts = sorted(set(training_args.compile_parts) - set(COMPILABLE_PARTS))
    check(not unknown_parts, f"--compile_parts {unknown_parts}: choose from {COMPILABLE_PARTS}")
    deepspeed_config = getattr(training_args, "hf_deepspeed_config", None)
    check(
        not (training_args.compile_parts and deepspeed_config is not None and deepspeed_config.is_zero3()),
        "--compile_parts does not work under ZeRO-3 (its parameters are gathered by module hooks "
        "that compiled code bypasses): use ZeRO-2 or drop the option",
    )
    check(
        training_args.loss_chunk_size is None or training_args.loss_chunk_size > 0,
        f"--loss_chunk_size {training_args.loss_chunk_size}: must be positive (or unset)",
    )
    for option, paths in (
        ("--data_path", data_args.data_path),
        ("--eval_data_path", data_args.eval_data_path),
    ):
        if paths is None:
            continue
        try:
            for source in parse_data_path(paths, data_args.image_folder):
                if source.path.endswith((".json", ".jsonl")):
                    check(Path(source.path).is_file(), f"{option} {source.path}: file not found")
                if option == "--eval_data_path":
                    check(
                        source.weight == 1,
                        f"{option} {source.path}: evaluation reads every row once (no weights)",
                    )
        except ValueError as error:
            errors.append(f"{option}: {error}")
    check(
        training_args.eval_strategy == "no" or data_args.eval_data_path is not None,
        f"--eval_strategy {training_args.eval_strategy.value} needs --eval_data_path",
    )
    if data_args.image_folder is not None:
        check(
            Path(data_args.image_folder).is_dir(), f"--image_folder {data_args.image_folder}: not a directory"
        )
    if model_args.pretrain_mm_mlp_adapter is not None:
        check(
            Path(model_args.pretrain_mm_mlp_adapter).is_file(),
            f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}: file not found",
        )
    resume = training_args.resume_from_checkpoint
    if resume not in (None, "auto"):
        check(Path(resume).is_dir(), f"--resume_from_checkpoint {resume}: not a directory (or use 'auto')")
    if errors:
        raise ValueError("invalid training options:\n  - " + "\n  - ".join(errors))


def resolved_config(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, Any]:
    """Everything the run was started with, JSON-serializable, for ``training_config.json``."""
    import torch

    from tokenpacker_llava import __version__

    return {
        "stage": model_args.stage,
        "template": model_args.template,
        "model": asdict(model_args),
        "data": asdict(data_args),
        "training": json.loads(training_args.to_json_string()),
        "versions": {
            "tokenpacker_llava": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
