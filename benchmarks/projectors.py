"""The paper's projector comparison in miniature: same data, same parts, same recipe, one
projector at a time.

On the demo's synthetic fine-grained dataset (small coloured shapes on a 4 x 4 grid; questions
about colour, shape, presence and count), each projector is trained through the real training
entry point (stage 1 projector only, then stage 2 projector + LLM) on the demo's tiny
"pretrained" parts, for every seed, and scored on held-out questions. The tower sees an 8 x 8
patch grid, so the paper's 576 / 144 / 64 tokens (full, 1/4, 1/9 of a 24 x 24 grid) become
64 (MLP, every patch) / 16 (scale 2) / 4 (scale 4) here: the 16-token setting is the
paper's main comparison (TokenPacker at a quarter of the tokens against the full-token MLP and
the other compressors); 4 tokens (each token must summarize four cells) is a harsher bottleneck
than the paper's 64.

    python benchmarks/projectors.py                  # 15 configurations x 3 seeds, ~21 min on 2 cores
    python benchmarks/projectors.py --quick          # seconds; what the test runs

Prints a table (accuracy per question type, mean +- spread over seeds, visual tokens,
projector parameters, stage-2 training tokens/s) and writes ``results.json`` and
``accuracy_vs_tokens.png`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tokenpacker_llava.demo import synthetic
from tokenpacker_llava.demo.run import DemoSettings, Prepared, answer, prepare, results_table

logger = logging.getLogger("benchmarks.projectors")

# (projector, scale factor); the scale of token-preserving projectors is 1.
COMPRESSORS = (
    "tokenpacker",
    "tokenpacker_single",
    "avgpool_mlp",
    "pixel_shuffle",
    "ldpv2",
    "c_abstractor",
    "resampler",
)
DEFAULT_CONFIGS = (("mlp2x_gelu", 1), *((name, s) for s in (2, 4) for name in COMPRESSORS))


@dataclass
class ShootoutSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    configs: tuple[tuple[str, int], ...] = DEFAULT_CONFIGS
    # Smaller than the demo's budget, so that differences are not hidden by a ceiling. The LLM
    # learns scene descriptions in both layouts it will read (16 tokens, one per cell, and the
    # MLP's 64, one per patch). The tower keeps the demo's cell probe: a per-patch probe
    # (`vision_probe="patch"`) lowered every projector (README, "Projector shoot-out").
    demo: DemoSettings = field(
        default_factory=lambda: DemoSettings(
            train_images=1500, eval_questions=300, stage2_epochs=2.0, description_sides=(4, 8)
        )
    )

    @classmethod
    def quick(cls) -> ShootoutSettings:
        return cls(
            seeds=(0,),
            configs=(("mlp2x_gelu", 1), ("tokenpacker", 2)),
            demo=replace(DemoSettings.quick(), description_sides=(4, 8), vision_probe="patch"),
        )


def _stage_args(
    prepared: Prepared, settings: DemoSettings, name: str, scale: int, output_dir: Path
) -> list[str]:
    args = [
        "--model_name_or_path", str(prepared.llm),
        "--vision_tower", str(prepared.vision),
        "--mm_projector_type", name,
        "--image_folder", str(prepared.images),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", str(settings.batch_size),
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "cosine",
        "--warmup_ratio", "0.03",
        "--weight_decay", "0.0",
        "--model_max_length", "256",
        "--logging_steps", "10",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu", "True",
        "--dataloader_num_workers", "0",
        "--seed", str(settings.seed),
        "--disable_tqdm", "True",
    ]  # fmt: skip
    if scale > 1:
        args += ["--scale_factor", str(scale)]
    if settings.max_steps > 0:
        args += ["--max_steps", str(settings.max_steps)]
    return args


def _train(argv: list[str]):
    from tokenpacker_llava.train import parse_arguments, run, validate

    model_args, data_args, training_args = parse_arguments(argv)
    validate(model_args, data_args, training_args)
    return run(model_args, data_args, training_args)


def run_config(prepared: Prepared, settings: DemoSettings, name: str, scale: int, output_dir: Path) -> dict:
    """Stage 1 and stage 2 with one projector, then the held-out questions."""
    stage1, stage2 = output_dir / "stage1", output_dir / "stage2"
    common = _stage_args(prepared, settings, name, scale, stage1)
    _train(
        [
            *common,
            "--version", "plain",
            "--tune_mm_mlp_adapter", "True",
            "--data_path", str(prepared.data / "captions.json"),
            "--num_train_epochs", str(settings.stage1_epochs),
        ]
    )  # fmt: skip
    common = _stage_args(prepared, settings, name, scale, stage2)
    trainer = _train(
        [
            *common,
            "--version", "v1",
            "--pretrain_mm_mlp_adapter", str(stage1 / "projector.safetensors"),
            "--data_path", str(prepared.data / "instructions.json"),
            "--num_train_epochs", str(settings.stage2_epochs),
            "--group_by_modality_length", "False",
        ]
    )  # fmt: skip
    model = trainer.model
    speeds = [
        entry["tokens_per_second"] for entry in trainer.state.log_history if "tokens_per_second" in entry
    ]
    runtime = next(e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e)
    result = {
        "projector": name,
        "scale": scale,
        "tokens": model.num_image_tokens,
        "projector_params": sum(p.numel() for p in model.projector.parameters()),
        "tokens_per_second": statistics.mean(speeds) if speeds else None,
        "stage2_seconds": runtime,
    }
    del trainer, model
    questions = json.loads((prepared.data / "eval.json").read_text())
    _, scores = results_table(questions, answer(stage2, questions, prepared.images))
    result["accuracy"] = {kind: scores[kind]["accuracy"] for kind in (*synthetic.QUESTION_TYPES, "all")}
    result["chance"] = {kind: scores[kind]["chance"] for kind in synthetic.QUESTION_TYPES}
    return result


def _mean_spread(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    if len(values) < 2:
        return f"{mean:5.1f}"
    return f"{mean:5.1f}+-{100 * (max(values) - min(values)) / 2:4.1f}"


def summarize(results: list[dict]) -> tuple[str, list[dict]]:
    """One row per (projector, scale): accuracies as mean +- half range over seeds."""
    rows: dict[tuple[str, int], list[dict]] = {}
    for result in results:
        rows.setdefault((result["projector"], result["scale"]), []).append(result)
    kinds = (*synthetic.QUESTION_TYPES, "all")
    header = (
        f"{'projector':<20}{'tokens':>7}{'params':>9}{'tok/s':>8}  "
        + "".join(f"{kind:>12}" for kind in kinds)
        + f"{'seeds':>7}"
    )
    lines, summary = [header, "-" * len(header)], []
    for (name, scale), runs in sorted(rows.items(), key=lambda item: (-item[1][0]["tokens"], item[0][0])):
        speeds = [r["tokens_per_second"] for r in runs if r["tokens_per_second"]]
        accuracy = {kind: [r["accuracy"][kind] for r in runs] for kind in kinds}
        row = {
            "projector": name,
            "scale": scale,
            "tokens": runs[0]["tokens"],
            "projector_params": runs[0]["projector_params"],
            "tokens_per_second": statistics.mean(speeds) if speeds else None,
            "accuracy_mean": {k: statistics.mean(v) for k, v in accuracy.items()},
            "accuracy_runs": accuracy,
        }
        summary.append(row)
        speed = f"{row['tokens_per_second']:8.0f}" if speeds else f"{'-':>8}"
        lines.append(
            f"{name:<20}{row['tokens']:>7}{row['projector_params'] / 1e3:>8.0f}k{speed}  "
            + "".join(f"{_mean_spread(accuracy[kind]):>12}" for kind in kinds)
            + f"{len(runs):>7}"
        )
    chance = {k: statistics.mean(r["chance"][k] for r in results) for k in synthetic.QUESTION_TYPES}
    lines.append(
        f"{'chance (majority)':<20}{'':>7}{'':>9}{'':>8}  "
        + "".join(f"{100 * chance[k]:>12.1f}" for k in synthetic.QUESTION_TYPES)
    )
    return "\n".join(lines), summary


def plot(summary: list[dict], path: Path) -> None:
    """Overall accuracy against visual tokens, one marker per projector, seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    names = sorted({row["projector"] for row in summary})
    markers = "os^vD<>xP*"
    for index, name in enumerate(names):
        rows = sorted((r for r in summary if r["projector"] == name), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in rows]
        means = [100 * r["accuracy_mean"]["all"] for r in rows]
        runs = [[100 * v for v in r["accuracy_runs"]["all"]] for r in rows]
        errors = [
            [m - min(v) for m, v in zip(means, runs, strict=True)],
            [max(v) - m for m, v in zip(means, runs, strict=True)],
        ]
        axes.errorbar(tokens, means, yerr=errors, marker=markers[index % len(markers)], capsize=3, label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("visual tokens per image")
    axes.set_ylabel("held-out accuracy, all questions (%)")
    axes.set_title("Projector shoot-out on the synthetic fine-grained dataset")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_shootout(output_dir: Path, settings: ShootoutSettings) -> list[dict]:
    started = time.perf_counter()
    results = []
    total = len(settings.seeds) * len(settings.configs)
    for seed in settings.seeds:
        demo = DemoSettings(**{**asdict(settings.demo), "seed": seed})
        prepared = prepare(output_dir / f"seed{seed}", demo)
        for name, scale in settings.configs:
            logger.info("[%d/%d] seed %d: %s at scale %d", len(results) + 1, total, seed, name, scale)
            result = run_config(prepared, demo, name, scale, output_dir / f"seed{seed}" / f"{name}_s{scale}")
            result["seed"] = seed
            results.append(result)
            (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    table, summary = summarize(results)
    plot(summary, output_dir / "accuracy_vs_tokens.png")
    elapsed = time.perf_counter() - started
    (output_dir / "results.json").write_text(
        json.dumps(
            {"settings": asdict(settings), "runs": results, "summary": summary, "seconds": elapsed}, indent=2
        )
    )
    print("\nProjector shoot-out: held-out accuracy (%) by question type, mean +- half range over seeds")
    print(table)
    print(f"\nplot: {output_dir / 'accuracy_vs_tokens.png'}   total time {elapsed / 60:.1f} min")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/shootout")
    parser.add_argument(
        "--quick", action="store_true", help="2 configurations, 1 seed, a few steps (the test)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default 0 1 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ShootoutSettings.quick() if args.quick else ShootoutSettings()
    if args.seeds:
        settings.seeds = tuple(args.seeds)
    run_shootout(Path(args.output_dir).resolve(), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
