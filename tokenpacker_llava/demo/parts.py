"""The demo's "pretrained" parts, made locally because nothing can be downloaded.

- a SentencePiece (Llama-style, byte fallback) tokenizer trained on the demo's text;
- a tiny Llama pretrained on conversations about *described* scenes (each image replaced by
  one symbol per grid cell, ``synthetic.described_conversations``): it learns the words, the
  chat template and how to answer the questions from a description before it ever sees an
  image, the role Vicuna plays in the real recipe;
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

from tokenpacker_llava.data.records import ROLES, Turn
from tokenpacker_llava.data.templates import get_template
from tokenpacker_llava.data.tokenize import tokenize_conversation
from tokenpacker_llava.demo.synthetic import (
    CELL_SYMBOLS,
    COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    DescribedConversation,
    random_scene,
    render,
)
from tokenpacker_llava.tokenization import ensure_image_token, train_llama_tokenizer

logger = logging.getLogger(__name__)


def train_tokenizer(corpus: list[str], folder: Path, vocab_size: int) -> Path:
    extra = ["A chat between", "USER:", "ASSISTANT:", "Answer with one word."]
    return train_llama_tokenizer(
        corpus + extra * 10, folder, vocab_size=vocab_size, user_defined_symbols=CELL_SYMBOLS
    )


def _described_sample(
    conversation: DescribedConversation, tokenizer, image_token_id: int, side: int = GRID
) -> tuple[list[int], list[int]]:
    """Token ids and labels of ``conversation`` rendered by its template, with the
    ``side * side`` image placeholders replaced by the ids of the scene's description."""
    template = get_template(conversation.template, tokenizer)
    turns = [Turn(ROLES[speaker], text) for speaker, text in conversation.turns]
    sample = tokenize_conversation(
        turns,
        template,
        tokenizer,
        image_token_id=image_token_id,
        tokens_per_image=side * side,
        max_length=None,
    )
    cells = tokenizer.convert_tokens_to_ids(conversation.scene.symbols(side))
    ids, position = list(sample.input_ids), 0
    for index, token in enumerate(ids):
        if token == image_token_id:
            ids[index], position = cells[position], position + 1
    return ids, sample.labels


def pretrain_llm(
    conversations: list[DescribedConversation],
    folder: Path,
    *,
    hidden: int,
    layers: int,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    description_sides: tuple[int, ...] = (GRID,),
) -> Path:
    """A tiny Llama trained on ``conversations`` (answers supervised); saved with the tokenizer.

    Conversation ``i`` describes its scene on a ``description_sides[i % len]`` grid, so the
    LLM knows each visual-token layout it will be given (the 16 tokens of scale-2 projectors,
    and with side 8 the 64 of a per-patch MLP).
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_token_id = ensure_image_token(tokenizer)
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
    samples = [
        _described_sample(c, tokenizer, image_token_id, description_sides[i % len(description_sides)])
        for i, c in enumerate(conversations)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    warmup = max(1, steps // 20)
    progress = tqdm(range(steps), desc="pretraining the tiny LLM on described scenes", unit="step")
    for step in progress:
        batch = rng.sample(samples, batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    logger.info("tiny LLM loss on described scenes after pretraining: %.3f", loss.item())
    model.save_pretrained(folder)
    return folder


VISION_PROBES = ("cell", "patch")


class CellProbe(nn.Module):
    """Linear read-out of grid cells' colour and shape from the tower's patch features.

    ``cell``: one read-out per cell, from the mean of the cell's patches (a single patch need
    not say what its cell holds). ``patch``: one read-out per patch, of the cell it lies in, so
    every patch feature must carry its cell's content (what a per-patch projector needs).
    """

    def __init__(self, width: int, kind: str = "cell") -> None:
        super().__init__()
        if kind not in VISION_PROBES:
            raise ValueError(f"unknown vision probe {kind!r}; choose from {VISION_PROBES}")
        self.kind = kind
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)

    def forward(self, patches: torch.Tensor, patches_per_side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, positions, classes): 16 cells, or every patch in reading order."""
        if self.kind == "cell":
            batch, _, width = patches.shape
            grid = patches.transpose(1, 2).reshape(batch, width, patches_per_side, patches_per_side)
            patches = F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2)  # (B, 16, width)
        return self.colour(patches), self.shape(patches)

    def positions(self, patches_per_side: int) -> torch.Tensor:
        """The cell (0..15) behind each read-out position."""
        if self.kind == "cell":
            return torch.arange(GRID * GRID)
        per_cell = patches_per_side // GRID
        rows = torch.arange(patches_per_side) // per_cell
        return (rows[:, None] * GRID + rows[None, :]).flatten()


def _cell_targets(scene) -> tuple[list[int], list[int]]:
    colours, shapes = [0] * GRID * GRID, [0] * GRID * GRID
    names = sorted(COLOURS)
    for (row, col), (shape, colour) in scene.cells.items():
        index = (row - 1) * GRID + (col - 1)
        colours[index] = 1 + names.index(colour)
        shapes[index] = 1 + SHAPES.index(shape)
    return colours, shapes


def pretrain_vision(
    folder: Path, *, hidden: int, layers: int, patch: int, steps: int, seed: int, probe: str = "cell"
) -> Path:
    """A tiny CLIP vision tower whose query layer (-2) linearly encodes every cell's content
    (read from each cell's mean patch, or with ``probe="patch"`` from every patch)."""
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
    side = IMAGE_SIZE // patch
    reader = CellProbe(hidden, probe)
    cells = reader.positions(side)
    parameters = list(model.parameters()) + list(reader.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.0)
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    for step in tqdm(range(steps), desc="pretraining the tiny vision tower", unit="step"):
        scenes = [random_scene(rng) for _ in range(32)]
        pixels = torch.stack([(to_tensor(render(scene, rng)) - mean) / std for scene in scenes])
        targets = [_cell_targets(s) for s in scenes]
        colour_target = torch.tensor([t[0] for t in targets])[:, cells]
        shape_target = torch.tensor([t[1] for t in targets])[:, cells]
        hidden_states = model(pixels, output_hidden_states=True).hidden_states
        patches = hidden_states[-2][:, 1:]  # the query layer TokenPacker reads, CLS dropped
        colour_logits, shape_logits = reader(patches, side)
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
