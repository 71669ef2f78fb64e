"""A seeded, procedurally generated dataset whose questions need fine detail.

Each 64 x 64 image is a 4 x 4 grid of 16 px cells; 1-5 cells hold a small (10-13 px)
coloured shape. Stage 1 gets a caption listing every shape with its cell; stage 2 gets
multi-turn questions: the colour of the one circle/square/triangle, the shape of the one
red/green/... shape, whether a given coloured shape is present, and how many shapes of a
kind there are. The held-out split keeps one question per row with its exact-match answer and
question type, so accuracy can be reported per type against the majority-answer baseline.

``described_conversations`` writes the same conversations about fresh scenes with the image
replaced by a text description of its 16 cells (one symbol per cell, e.g. ``<red-circle>``):
the demo's tiny LLM is pretrained on them, the role Vicuna's text abilities play in the real
recipe (it can already answer questions about a described scene; the projector has to learn to
describe the image to it).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 220), "yellow": (225, 195, 30)}
SHAPES = ("circle", "square", "triangle")
GRID = 4
CELL = 16
IMAGE_SIZE = GRID * CELL
BACKGROUND = (235, 235, 235)
QUESTION_TYPES = ("colour", "shape", "exists", "count")
SYSTEM = "Answer with one word."


EMPTY_CELL = "<empty>"


def cell_symbol(shape: str, colour: str) -> str:
    return f"<{colour}-{shape}>"


CELL_SYMBOLS = (EMPTY_CELL, *(cell_symbol(shape, colour) for colour in sorted(COLOURS) for shape in SHAPES))


@dataclass(frozen=True)
class Scene:
    cells: dict[tuple[int, int], tuple[str, str]]  # (row, column), 1-based -> (shape, colour)

    def symbols(self, side: int = GRID) -> list[str]:
        """The scene's description: one symbol (one token) per cell in reading order.

        ``side`` > GRID describes it on a finer ``side x side`` grid in reading order, each
        position taking the symbol of the cell it lies in: the layout of a projector that keeps
        one token per patch (side 8: the demo tower's 8 x 8 patches, 4 per cell).
        """
        if side % GRID:
            raise ValueError(f"a description grid of side {side} does not tile the {GRID} x {GRID} cells")
        per_cell = side // GRID
        return [
            cell_symbol(*self.cells[cell])
            if (cell := (row // per_cell + 1, col // per_cell + 1)) in self.cells
            else EMPTY_CELL
            for row in range(side)
            for col in range(side)
        ]


def random_scene(rng: random.Random) -> Scene:
    positions = [(row, col) for row in range(1, GRID + 1) for col in range(1, GRID + 1)]
    chosen = rng.sample(positions, rng.randint(1, 5))
    return Scene({pos: (rng.choice(SHAPES), rng.choice(sorted(COLOURS))) for pos in sorted(chosen)})


def render(scene: Scene, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for (row, col), (shape, colour) in scene.cells.items():
        size = rng.randint(10, 13)
        left = (col - 1) * CELL + (CELL - size) // 2 + rng.randint(-1, 1)
        top = (row - 1) * CELL + (CELL - size) // 2 + rng.randint(-1, 1)
        box = (left, top, left + size, top + size)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    parts = [
        f"{colour} {shape} in row {row} column {col}" for (row, col), (shape, colour) in scene.cells.items()
    ]
    return "; ".join(parts) + "."


def question(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One question of ``kind`` about ``scene`` and its exact answer.

    Questions name shapes by their content (colour, kind), not their cell, so answering means
    finding the right small shape among the packed visual tokens and reading it precisely.
    """
    shapes = list(scene.cells.values())
    if kind == "colour":
        unique = [s for s in SHAPES if sum(shape == s for shape, _ in shapes) == 1]
        if unique:
            target = rng.choice(unique)
            return f"What colour is the {target}?", next(c for s, c in shapes if s == target)
        kind = "count"  # no shape kind occurs exactly once: ask a count instead
    if kind == "shape":
        unique = [c for c in sorted(COLOURS) if sum(colour == c for _, colour in shapes) == 1]
        if unique:
            target = rng.choice(unique)
            return f"What shape is {target}?", next(s for s, c in shapes if c == target)
        kind = "count"
    if kind == "exists":
        if rng.random() < 0.5:  # balance yes and no
            shape, colour = rng.choice(shapes)
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        return f"Is there a {colour} {shape}?", "yes" if (shape, colour) in shapes else "no"
    shape = rng.choice(SHAPES)
    return f"How many {shape}s are there?", str(sum(s == shape for s, _ in shapes))


def write_split(folder: Path, split: str, count: int, seed: int) -> Path:
    """Images under ``folder/images`` and ``folder/{split}.json``; returns the JSON path."""
    rng = random.Random(f"{seed}-{split}")
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        scene = random_scene(rng)
        name = f"{split}_{index:05d}.png"
        render(scene, rng).save(images / name)
        if split == "captions":
            records.append(_record(f"{split}-{index}", name, caption_turns(scene)))
        elif split in ("instructions", "validation"):
            records.append(_record(f"{split}-{index}", name, instruction_turns(scene, rng)))
        else:
            kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
            text, answer = question(scene, kind, rng)
            records.append(
                {
                    "question_id": f"{split}-{index}",
                    "image": name,
                    "text": text,
                    "answer": answer,
                    "type": kind,
                }
            )
    path = folder / f"{split}.json"
    path.write_text(json.dumps(records))
    return path


def caption_turns(scene: Scene) -> list[tuple[str, str]]:
    return [("human", "<image>\nDescribe the image."), ("gpt", caption(scene))]


def instruction_turns(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Three questions of different types, the image in the first one."""
    turns = [("system", SYSTEM)]
    for position, kind in enumerate(rng.sample(QUESTION_TYPES, 3)):
        text, answer = question(scene, kind, rng)
        turns += [("human", ("<image>\n" if position == 0 else "") + text), ("gpt", answer)]
    return turns


@dataclass(frozen=True)
class DescribedConversation:
    """A conversation whose ``<image>`` stands for ``scene.symbols()`` instead of pixels."""

    template: str  # "plain" (stage-1 captions) or "vicuna_v1" (stage-2 questions)
    turns: list[tuple[str, str]]
    scene: Scene


def described_conversations(count: int, seed: int) -> list[DescribedConversation]:
    """Caption and question conversations about ``count`` fresh scenes (the LLM's pretraining)."""
    rng = random.Random(f"{seed}-described")
    conversations = []
    for _ in range(count):
        scene = random_scene(rng)
        conversations.append(DescribedConversation("plain", caption_turns(scene), scene))
        conversations.append(DescribedConversation("vicuna_v1", instruction_turns(scene, rng), scene))
    return conversations


def _record(record_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    return {"id": record_id, "image": image, "conversations": [{"from": s, "value": v} for s, v in turns]}


def text_corpus(folder: Path) -> list[str]:
    """Every caption, question and answer text (the tokenizer's training text)."""
    lines = []
    for split in ("captions", "instructions"):
        for record in json.loads((folder / f"{split}.json").read_text()):
            lines.extend(turn["value"].replace("<image>\n", "") for turn in record["conversations"])
    return lines


def majority_baseline(questions: list[dict]) -> dict[str, float]:
    """Per question type, the accuracy of always giving that type's most common answer."""
    baseline = {}
    for kind in QUESTION_TYPES:
        answers = Counter(q["answer"] for q in questions if q["type"] == kind)
        baseline[kind] = max(answers.values()) / sum(answers.values()) if answers else 0.0
    return baseline
