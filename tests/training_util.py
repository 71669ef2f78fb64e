"""Tiny pretrained-looking parts on disk for training tests: an LLM folder with its
SentencePiece tokenizer, a CLIP folder with its image processor, and LLaVA-format data."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from conftest import tiny_text_config, tiny_vision_config, train_sentencepiece
from PIL import Image
from transformers import AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionModel

VOCAB = 400
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}


def make_parts(root: Path) -> dict[str, Path]:
    """LLM + tokenizer, vision tower + processor, caption data and instruction data."""
    torch.manual_seed(0)
    llm = root / "llm"
    train_sentencepiece(llm)
    AutoModelForCausalLM.from_config(tiny_text_config("llama", vocab_size=VOCAB)).save_pretrained(llm)
    vision = root / "clip"
    CLIPVisionModel(tiny_vision_config("clip", num_layers=4)).save_pretrained(vision)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size=48).save_pretrained(vision)
    images = root / "images"
    images.mkdir()
    rng = random.Random(0)
    captions, instructions = [], []
    for index in range(24):
        colour = rng.choice(sorted(COLOURS))
        name = f"{index:03d}.png"
        Image.new("RGB", (40 + index, 48), COLOURS[colour]).save(images / name)
        captions.append(
            {
                "id": f"cap{index}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture."},
                    {"from": "gpt", "value": f"a {colour} square"},
                ],
            }
        )
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": f"It is {colour}."},
        ]
        if index % 3 == 0:
            turns += [
                {"from": "human", "value": "Is it a circle?"},
                {"from": "gpt", "value": "No, a square."},
            ]
        instructions.append({"id": f"ins{index}", "image": name, "conversations": turns})
        if index % 4 == 0:  # text-only rows, as in mix665k
            instructions.append(
                {
                    "id": f"txt{index}",
                    "conversations": [
                        {"from": "human", "value": "Say hello."},
                        {"from": "gpt", "value": "Hello to you too."},
                    ],
                }
            )
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instructions.json").write_text(json.dumps(instructions))
    return {
        "llm": llm,
        "vision": vision,
        "images": images,
        "captions": root / "captions.json",
        "instructions": root / "instructions.json",
    }


def _common_args(parts: dict[str, Path], output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(parts["llm"]),
        "--vision_tower", str(parts["vision"]),
        "--mm_projector_type", "tokenpacker",
        "--scale_factor", "2",
        "--image_folder", str(parts["images"]),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--max_steps", "4",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--report_to", "none",
        "--use_cpu", "True",
        "--dataloader_num_workers", "0",
        "--seed", "1",
        "--disable_tqdm", "True",
    ]  # fmt: skip


def stage1_args(parts: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        *_common_args(parts, output_dir),
        "--version", "plain",
        "--tune_mm_mlp_adapter", "True",
        "--data_path", str(parts["captions"]),
        "--learning_rate", "1e-3",
        "--model_max_length", "128",
        *extra,
    ]  # fmt: skip


def stage2_args(parts: dict[str, Path], output_dir: Path, projector: Path | None, *extra: str) -> list[str]:
    """Stage-2 options; ``projector=None`` starts from a fresh projector instead of stage 1's."""
    return [
        *_common_args(parts, output_dir),
        "--version", "v1",
        *(("--pretrain_mm_mlp_adapter", str(projector)) if projector is not None else ()),
        "--data_path", str(parts["instructions"]),
        "--learning_rate", "2e-4",
        "--model_max_length", "160",
        "--group_by_modality_length", "True",
        *extra,
    ]  # fmt: skip


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# A small LoRA on the tiny LLM.
LORA_ARGS = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8")


def train(argv: list[str], callbacks=None):
    """Parse, validate and run ``argv`` in this process, as ``tokenpacker-llava train`` does."""
    from tokenpacker_llava.train import run
    from tokenpacker_llava.training.arguments import parse_arguments, validate

    model_args, data_args, training_args = parse_arguments(argv)
    validate(model_args, data_args, training_args)
    return run(model_args, data_args, training_args, callbacks=callbacks)
