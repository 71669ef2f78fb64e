"""``python -m tokenpacker_llava.demo``: the whole pipeline on CPU in a few minutes.

1. generate the synthetic dataset (captions, instructions, held-out questions);
2. make the "pretrained" parts: tokenizer, tiny Llama (pretrained on conversations about
   described scenes), tiny CLIP-style tower (pretrained with a per-cell probe); see demo.parts;
3. stage 1 then stage 2 through ``scripts/pretrain.sh`` / ``scripts/finetune.sh`` and the
   real training entry point (torchrun, one CPU process);
4. answer the held-out questions with batched greedy decoding, print accuracy per question
   type against the majority-answer baseline, and one chat sample.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenpacker_llava.demo import parts, synthetic
from tokenpacker_llava.training.curves import CURVES_FILE

logger = logging.getLogger("tokenpacker_llava.demo")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class DemoSettings:
    seed: int = 0
    train_images: int = 3000
    eval_questions: int = 400
    validation_conversations: int = 200  # held-out stage-2 conversations: the eval loss
    eval_steps: int = 100
    vocab_size: int = 512
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_steps: int = 600
    # Description grids the LLM is pretrained on: 4 = one token per cell (scale-2 projectors).
    description_sides: tuple[int, ...] = (4,)
    vision_hidden: int = 64
    vision_layers: int = 4
    patch_size: int = 8
    vision_steps: int = 300
    vision_probe: str = "cell"  # what the tower is pretrained to expose: see parts.CellProbe
    stage1_epochs: float = 1.0
    stage2_epochs: float = 3.0
    batch_size: int = 16
    max_steps: int = -1  # >0 caps each stage (the quick test)
    image_aspect_ratio: str = "pad"  # "slice": TokenPacker-HD tiling (a 64 px image is one tile)

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            train_images=48,
            eval_questions=16,
            validation_conversations=6,
            eval_steps=1,
            llm_steps=5,
            vision_steps=5,
            llm_layers=1,
            max_steps=2,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_stage(
    script: str, output_dir: Path, env_vars: dict[str, str], extra: list[str], settings: DemoSettings
) -> None:
    env = {
        **os.environ,
        "LAUNCHER": "torchrun",
        "GPUS_PER_NODE": "1",
        "NNODES": "1",
        "PYTHON": sys.executable,
        "OUTPUT_DIR": str(output_dir),
        "PER_DEVICE_BATCH": str(settings.batch_size),
        "GLOBAL_BATCH": str(settings.batch_size),
        "NUM_WORKERS": "0",
        "REPORT_TO": "none",
        "MAX_LENGTH": "256",
        "RESUME": "",
        "SAVE_STEPS": "100000",
        "PROJECTOR_TYPE": "tokenpacker",
        "SCALE_FACTOR": "2",
        "IMAGE_ASPECT_RATIO": settings.image_aspect_ratio,
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        # A free port, so a demo (or its test) can run next to another torchrun job.
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port()),
        **env_vars,
    }
    # The cluster recipe's GPU settings, switched off for a CPU run.
    cpu = [
        "--deepspeed",
        "",
        "--bf16",
        "False",
        "--tf32",
        "False",
        "--use_cpu",
        "True",
        "--gradient_checkpointing",
        "False",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "False",
        "--logging_steps",
        "10",
    ]
    if settings.max_steps > 0:
        cpu += ["--max_steps", str(settings.max_steps)]
    command = ["bash", str(REPO / "scripts" / script), *cpu, *extra]
    logger.info("running %s", " ".join(command))
    subprocess.run(command, cwd=REPO, env=env, check=True)


def answer(model_dir: Path, questions: list[dict], image_folder: Path, batch_size: int = 32) -> list[str]:
    """Batched greedy answers to held-out questions (the same prompt format as training)."""
    from tokenpacker_llava.data.records import Turn
    from tokenpacker_llava.inference.generation import GenerationSettings, generate
    from tokenpacker_llava.inference.loading import load_model

    loaded = load_model(model_dir, template="vicuna_v1")
    images = loaded.images(image_folder)  # pad, resize or slice, as the model config says
    settings = GenerationSettings(max_new_tokens=6)
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        visuals = [images(q["image"]) for q in chunk]
        prompts = [
            loaded.prompt_ids(
                [Turn("system", synthetic.SYSTEM), Turn("user", "<image>\n" + q["text"])], [visual]
            )
            for q, visual in zip(chunk, visuals, strict=True)
        ]
        answers.extend(
            text.strip() for text in generate(loaded, prompts, [v.pixel_values for v in visuals], settings)
        )
    return answers


def normalize(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def results_table(questions: list[dict], answers: list[str]) -> tuple[str, dict]:
    baseline = synthetic.majority_baseline(questions)
    rows, results = [], {}
    for kind in synthetic.QUESTION_TYPES:
        pairs = [(q, a) for q, a in zip(questions, answers, strict=True) if q["type"] == kind]
        correct = sum(normalize(a) == q["answer"] for q, a in pairs)
        accuracy = correct / len(pairs) if pairs else 0.0
        results[kind] = {"n": len(pairs), "chance": baseline[kind], "accuracy": accuracy}
        rows.append(f"{kind:<8} {len(pairs):>5} {100 * baseline[kind]:>9.1f}% {100 * accuracy:>9.1f}%")
    total = sum(normalize(a) == q["answer"] for q, a in zip(questions, answers, strict=True)) / max(
        len(questions), 1
    )
    results["all"] = {"n": len(questions), "accuracy": total}
    header = f"{'type':<8} {'n':>5} {'chance':>10} {'accuracy':>10}"
    return "\n".join(
        [header, *rows, f"{'all':<8} {len(questions):>5} {'':>10} {100 * total:>9.1f}%"]
    ), results


@dataclass(frozen=True)
class Prepared:
    """The demo's dataset and "pretrained" parts on disk."""

    data: Path  # captions.json, instructions.json, eval.json and images/
    llm: Path  # tokenizer + tiny Llama
    vision: Path  # tiny CLIP tower + image processor

    @property
    def images(self) -> Path:
        return self.data / "images"


def prepare(output_dir: Path, settings: DemoSettings) -> Prepared:
    """Steps 1 and 2: the synthetic dataset, the tokenizer, the tiny LLM and the tiny tower."""
    data = output_dir / "data"
    logger.info("1/4 generating the synthetic dataset in %s", data)
    synthetic.write_split(data, "captions", settings.train_images, settings.seed)
    synthetic.write_split(data, "instructions", settings.train_images, settings.seed)
    synthetic.write_split(data, "validation", settings.validation_conversations, settings.seed)
    synthetic.write_split(data, "eval", settings.eval_questions, settings.seed)

    logger.info("2/4 making the tokenizer, the tiny LLM and the tiny vision tower")
    llm = parts.train_tokenizer(
        synthetic.text_corpus(data), output_dir / "parts" / "llm", settings.vocab_size
    )
    parts.pretrain_llm(
        synthetic.described_conversations(settings.train_images, settings.seed),
        llm,
        hidden=settings.llm_hidden,
        layers=settings.llm_layers,
        steps=settings.llm_steps,
        seed=settings.seed,
        description_sides=settings.description_sides,
    )
    vision = parts.pretrain_vision(
        output_dir / "parts" / "vision",
        hidden=settings.vision_hidden,
        layers=settings.vision_layers,
        patch=settings.patch_size,
        steps=settings.vision_steps,
        seed=settings.seed,
        probe=settings.vision_probe,
    )
    return Prepared(data=data, llm=llm, vision=vision)


def run_demo(output_dir: Path, settings: DemoSettings) -> dict:
    started = time.perf_counter()
    prepared = prepare(output_dir, settings)
    data, llm, vision = prepared.data, prepared.llm, prepared.vision
    eval_path = data / "eval.json"

    logger.info("3/4 stage 1 (projector) and stage 2 (projector + LLM) through scripts/")
    common = {"LLM": str(llm), "VISION_TOWER": str(vision), "IMAGE_FOLDER": str(data / "images")}
    stage1, stage2 = output_dir / "stage1", output_dir / "stage2"
    run_stage(
        "pretrain.sh",
        stage1,
        {
            **common,
            "DATA_PATH": str(data / "captions.json"),
            "LR": "1e-3",
            "EPOCHS": str(settings.stage1_epochs),
        },
        ["--seed", str(settings.seed)],
        settings,
    )
    run_stage(
        "finetune.sh",
        stage2,
        {
            **common,
            "DATA_PATH": str(data / "instructions.json"),
            "LR": "1e-3",
            "EPOCHS": str(settings.stage2_epochs),
            "PRETRAINED_PROJECTOR": str(stage1 / "projector.safetensors"),
            "EVAL_DATA_PATH": str(data / "validation.json"),
            "EVAL_STEPS": str(settings.eval_steps),
        },
        ["--seed", str(settings.seed), "--group_by_modality_length", "False"],
        settings,
    )

    logger.info("4/4 evaluating on %d held-out questions", settings.eval_questions)
    questions = json.loads(eval_path.read_text())
    answers = answer(stage2, questions, data / "images")
    table, results = results_table(questions, answers)
    sample = questions[0]
    elapsed = time.perf_counter() - started
    # The stage-2 loss on held-out conversations, every eval_steps steps and at the end.
    validation = [
        (entry["step"], round(entry["eval_loss"], 4))
        for entry in json.loads((stage2 / "trainer_state.json").read_text())["log_history"]
        if "eval_loss" in entry
    ]
    summary = {
        "settings": asdict(settings),
        "results": results,
        "validation_loss": validation,
        "seconds": round(elapsed, 1),
        "model": str(stage2),
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print("\nTokenPacker demo: accuracy on held-out questions (exact match)")
    print(table)
    print(
        f"\nchat sample ({sample['image']}):\n  USER: {sample['text']}\n  ASSISTANT: {answers[0]}   (expected: {sample['answer']})"
    )
    print(
        "\nstage-2 loss on held-out conversations (step: loss): "
        + ", ".join(f"{s}: {v}" for s, v in validation)
    )
    print(f"training curves: {stage1 / CURVES_FILE}, {stage2 / CURVES_FILE}")
    print(f"\ntrained model: {stage2}\nresults: {output_dir / 'results.json'}   total time {elapsed:.0f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenpacker_llava.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (seconds; for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_aspect_ratio", choices=("pad", "resize", "slice"), default="pad")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    settings.image_aspect_ratio = args.image_aspect_ratio
    run_demo(Path(args.output_dir).resolve(), settings)
    return 0
