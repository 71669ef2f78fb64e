"""The demo's "pretrained" parts, made locally because nothing can be downloaded.

- a SentencePiece (Llama-style, byte fallback) tokenizer trained on the demo's text;
- a tiny Llama pretrained as a plain language model on the same text, so that it knows
  the words before it ever sees an image (the role Vicuna plays in the real recipe);
- a tiny CLIP-style ViT pretrained with a supervised objective: from its query-layer
  patch features, a linear probe must tell each grid cell's colour and shape. That is the
  role of CLIP's pretraining: features that already describe what is where.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tokenpacker_llava.demo.synthetic import COLOURS, GRID, IMAGE_SIZE, SHAPES, random_scene, render
from tokenpacker_llava.tokenization import train_llama_tokenizer

logger = logging.getLogger(__name__)


def train_tokenizer(corpus: list[str], folder: Path, vocab_size: int) -> Path:
    extra = ["A chat between", "USER:", "ASSISTANT:", "Answer with one word."]
    return train_llama_tokenizer(corpus + extra * 10, folder, vocab_size=vocab_size)


def pretrain_llm(corpus: list[str], folder: Path, *, hidden: int, layers: int, steps: int, seed: int) -> Path:
    """A tiny Llama trained as a language model on ``corpus``; saved with the tokenizer."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    texts = [tokenizer(line).input_ids + [tokenizer.eos_token_id] for line in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    for step in tqdm(range(steps), desc="pretraining the tiny LLM", unit="step"):
        batch = rng.sample(texts, 32)
        width = max(map(len, batch))
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch])
        labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in batch])
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    logger.info("tiny LLM language-model loss after pretraining: %.3f", loss.item())
    model.save_pretrained(folder)
    return folder


class CellProbe(nn.Module):
    """Linear read-out of each grid cell's colour and shape from pooled patch features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)

    def forward(self, patches: torch.Tensor, patches_per_side: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(batch, width, patches_per_side, patches_per_side)
        cells = F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)  # (B, 16, width)
        return self.colour(cells), self.shape(cells)


def _cell_targets(scene) -> tuple[list[int], list[int]]:
    colours, shapes = [0] * GRID * GRID, [0] * GRID * GRID
    names = sorted(COLOURS)
    for (row, col), (shape, colour) in scene.cells.items():
        index = (row - 1) * GRID + (col - 1)
        colours[index] = 1 + names.index(colour)
        shapes[index] = 1 + SHAPES.index(shape)
    return colours, shapes


def pretrain_vision(folder: Path, *, hidden: int, layers: int, patch: int, steps: int, seed: int) -> Path:
    """A tiny CLIP vision tower whose query layer (-2) linearly encodes every cell's content."""
    torch.manual_seed(seed)
    rng = random.Random(f"{seed}-vision")
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch,
    )
    model = CLIPVisionModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    probe = CellProbe(hidden)
    parameters = list(model.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.0)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    side = IMAGE_SIZE // patch
    for step in tqdm(range(steps), desc="pretraining the tiny vision tower", unit="step"):
        scenes = [random_scene(rng) for _ in range(32)]
        pixels = torch.stack([(to_tensor(render(scene, rng)) - mean) / std for scene in scenes])
        targets = [_cell_targets(s) for s in scenes]
        colour_target = torch.tensor([t[0] for t in targets])
        shape_target = torch.tensor([t[1] for t in targets])
        hidden_states = model(pixels, output_hidden_states=True).hidden_states
        patches = hidden_states[-2][:, 1:]  # the query layer TokenPacker reads, CLS dropped
        colour_logits, shape_logits = probe(patches, side)
        loss = F.cross_entropy(colour_logits.flatten(0, 1), colour_target.flatten()) + F.cross_entropy(
            shape_logits.flatten(0, 1), shape_target.flatten()
        )
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        accuracy = (
            (colour_logits.argmax(-1) == colour_target).float().mean().item(),
            (shape_logits.argmax(-1) == shape_target).float().mean().item(),
        )
    logger.info("vision probe accuracy (colour, shape) on the last batch: %.3f, %.3f", *accuracy)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
