"""``README.md`` model cards for saved TokenPacker-LLaVA folders.

The card is built from the folder itself: the configuration (projector, visual tokens per
image, vision tower, LLM) and the parameter counts read from the safetensors headers, so
no weights are loaded. Training settings and metrics are added when given.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from tokenpacker_llava.export.remote_code import AUTO_MAP, REMOTE_CODE_FILES
from tokenpacker_llava.models.configuration import TokenPackerLlavaConfig

CARD_NAME = "README.md"
TAGS = ["tokenpacker", "llava", "multimodal", "vision-language"]
# "other" is the Hub's value for "see the card"; the weights inherit their base models' licenses.
LICENSE_PLACEHOLDER = "other"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
COMPONENTS = {"vision_tower": "vision tower", "projector": "projector", "language_model": "language model"}


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SAFETENSORS_SINGLE
    return [single] if single.is_file() else []


def _read_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def count_parameters(folder: str | Path) -> dict[str, int] | None:
    """Parameters per top-level module (``vision_tower``, ``projector``, ``language_model`` ...)
    and ``total``, from the safetensors headers (weights are not read); None without safetensors.

    Tied weights are stored once, so they are counted once.
    """
    files = _safetensors_files(Path(folder))
    if not files:
        return None
    counts: dict[str, int] = {}
    for path in files:
        for name, info in _read_header(path).items():
            if name == "__metadata__":
                continue
            component = name.split(".", 1)[0]
            counts[component] = counts.get(component, 0) + math.prod(info["shape"])
    counts["total"] = sum(counts.values())
    return counts


def format_count(count: int) -> str:
    """``7241732096`` -> ``7.24B``; ``52300`` -> ``52.3K``; ``999950`` -> ``1M`` (rounded to three
    significant digits first, then given the unit the rounded value needs)."""
    if count < 1000:
        return str(count)
    rounded = float(f"{count:.3g}")
    units = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
    scale, suffix = next((scale, suffix) for scale, suffix in units if rounded >= scale)
    value = rounded / scale
    return f"{value:.3g}{suffix}" if value < 1000 else f"{value:.0f}{suffix}"


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            rows.extend(_flatten_metrics(value, prefix=f"{key}/"))
        else:
            rows.append((key, value))
    return rows


def _format_metric(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _python_block(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def _describe(
    config: TokenPackerLlavaConfig, counts: dict[str, int] | None, base_models: Mapping[str, str]
) -> str:
    vision, text = config.vision_config, config.text_config

    def count(part: str, first: bool = True) -> str:
        if not counts or part not in counts:
            return ""
        text = f"{format_count(counts[part])} parameters"
        return f" ({text})" if first else f", {text}"

    projector = f"`{config.projector_type}`"
    details = ""
    if config.projector_class.default_scale_factor != 1 or (config.scale_factor or 1) != 1:
        scale = getattr(config, "resolved_scale_factor", None) or config.scale_factor
        details = f" (scale factor {scale or config.projector_class.default_scale_factor}{count('projector', False)})"
    else:
        details = count("projector")
    feature_layer = config.vision_feature_layer % (vision.num_hidden_layers + 1)
    multi_level = config.resolved_multi_level_layers
    lines = [
        f"- **Projector:** {projector}{details}, **{config.num_image_tokens} visual tokens per image** "
        f"(from a {config.grid_size}x{config.grid_size} patch grid).",
        f"- **Vision tower:** `{vision.model_type}`, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
        f"{vision.image_size} px images in {vision.patch_size} px patches{count('vision_tower')}; "
        f"features from hidden state {feature_layer}"
        + (f", multi-level features from hidden states {multi_level}." if multi_level else "."),
        f"- **Language model:** `{text.model_type}`, {text.num_hidden_layers} layers, hidden size "
        f"{text.hidden_size}, vocabulary {text.vocab_size}{count('language_model')}.",
    ]
    if counts:
        lines.append(f"- **Total:** {format_count(counts['total'])} parameters ({counts['total']:,}).")
    for role, repo in base_models.items():
        lines.append(f"- **Base model ({role}):** [{repo}](https://huggingface.co/{repo})")
    return "\n".join(lines)


def _usage(repo: str, config: TokenPackerLlavaConfig, has_remote_code: bool) -> str:
    with_package = _python_block(
        f"""
import tokenpacker_llava  # registers the architecture with transformers' Auto classes
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained("{repo}")
"""
    )
    parts = ["## How to load", "", "With the `tokenpacker_llava` package installed:", "", with_package, ""]
    if has_remote_code:
        remote = _python_block(
            f"""
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained("{repo}", trust_remote_code=True)
"""
        )
        parts += [
            "Without it, with the code shipped in this repository "
            f"({', '.join(f'`{f}`' for f in REMOTE_CODE_FILES)}; read it before trusting it):",
            "",
            remote,
            "",
        ]
    if config.image_aspect_ratio == "slice":
        comma, newline = config.slice_separator_ids or ("?", "?")
        inputs = (
            f"Inputs (TokenPacker-HD slice mode, up to {config.patch_num} tiles): each image is cut into "
            f"{config.vision_config.image_size} px tiles plus, when there are several, a global view; in "
            f"`input_ids` every view is a run of {config.num_image_tokens} `{config.image_token}` placeholders "
            f"(token id {config.image_token_id}), tiles of a row separated by token {comma} (`,`) and every row "
            f"and the global view followed by token {newline} (newline); `pixel_values` holds the views in that "
            "order. `tokenpacker_llava.data.visual_inputs.ImageLoader` builds both."
        )
    else:
        inputs = (
            f"Inputs: each `{config.image_token}` placeholder (token id {config.image_token_id}) in `input_ids` "
            f"must be expanded to {config.num_image_tokens} copies, one image per placeholder in order; "
            f"images are {config.vision_config.image_size} px, preprocessed with "
            f"`image_aspect_ratio={config.image_aspect_ratio!r}`."
        )
    parts += [inputs]
    return "\n".join(parts)


def write_model_card(
    folder: str | Path,
    *,
    training_config: dict | None = None,
    base_models: dict[str, str] | None = None,
    datasets: list[str] | None = None,
    metrics: dict | None = None,
    repo_id: str | None = None,
    license: str | None = None,  # noqa: A002  (the Hub's field name)
) -> Path:
    """Write ``README.md`` (YAML front matter + description) into a saved model folder.

    Args:
        training_config: the training settings, shown as a collapsed JSON block; its
            ``license`` entry, if any, is used when ``license`` is not given.
        base_models: role -> Hub id, e.g. ``{"language_model": "lmsys/vicuna-7b-v1.5",
            "vision_tower": "openai/clip-vit-large-patch14-336"}``.
        datasets: Hub ids of the training datasets.
        metrics: benchmark -> score (nested dicts become ``a/b`` rows).
        repo_id: the Hub id used in the loading examples (default: the folder's name).
        license: a Hub license id; defaults to the placeholder ``other``.
    """
    folder = Path(folder)
    config = TokenPackerLlavaConfig.from_pretrained(folder)
    training_config = dict(training_config or {})
    base_models = dict(base_models or {})
    counts = count_parameters(folder)
    repo = repo_id or folder.resolve().name
    license_id = license or training_config.get("license") or LICENSE_PLACEHOLDER
    config_json = folder / "config.json"
    auto_map = json.loads(config_json.read_text(encoding="utf-8")).get("auto_map", {})
    has_remote_code = all((folder / f).is_file() for f in REMOTE_CODE_FILES) and all(
        auto_map.get(k) == v for k, v in AUTO_MAP.items()
    )

    card_data = ModelCardData(
        license=license_id,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(TAGS),
        base_model=list(base_models.values()) or None,
        datasets=list(datasets) if datasets else None,
    )
    title = repo.rsplit("/", 1)[-1]
    body = [
        f"# {title}",
        "",
        "A LLaVA-style multimodal model: vision tower -> "
        f"`{config.projector_type}` projector -> causal language model, built with the "
        "`tokenpacker_llava` package"
        + (
            " around TokenPacker, the coarse-to-fine visual projector of "
            "[arXiv 2407.02392](https://arxiv.org/abs/2407.02392)."
            if config.projector_type == "tokenpacker"
            else "."
        ),
        "",
        "## Model",
        "",
        _describe(config, counts, base_models),
        "",
        _usage(repo, config, has_remote_code),
    ]
    if license_id == LICENSE_PLACEHOLDER:
        body += [
            "",
            "## License",
            "",
            "Not set yet: these weights derive from their base models and inherit their licenses "
            "(set `license` in the front matter accordingly).",
        ]
    if datasets:
        body += [
            "",
            "## Training data",
            "",
            *(f"- [{d}](https://huggingface.co/datasets/{d})" for d in datasets),
        ]
    if training_config:
        settings = json.dumps(training_config, indent=2, sort_keys=True, default=str)
        body += [
            "",
            "## Training configuration",
            "",
            "<details>",
            "<summary>Training configuration (JSON)</summary>",
            "",
            f"```json\n{settings}\n```",
            "",
            "</details>",
        ]
    if metrics:
        rows = _flatten_metrics(metrics)
        body += ["", "## Evaluation", "", "| Benchmark | Score |", "| --- | --- |"]
        body += [f"| {name} | {_format_metric(value)} |" for name, value in rows]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    path = folder / CARD_NAME
    card.save(path)
    return path
