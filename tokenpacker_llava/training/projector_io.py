"""The stage-1 -> stage-2 hand-off: ``projector.safetensors`` with the geometry it was trained for.

The file holds the projector's weights plus metadata (projector type, scale, vision encoder,
layers, widths). Loading checks that metadata against the model and names every mismatch,
instead of failing later on shapes or, worse, loading weights trained for another layer.
Under DeepSpeed ZeRO-3 the parameters are partitioned (``torch.Size([0])`` locally, where
LLaVA's loader breaks), so they are gathered, written on rank 0 and re-partitioned.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.trainer_utils import unwrap_peft_model

from tokenpacker_llava.models.configuration import TokenPackerLlavaConfig

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "projector.safetensors"
FORMAT = "tokenpacker-llava-projector/1"


def projector_metadata(config: TokenPackerLlavaConfig) -> dict[str, str]:
    """What a projector's weights depend on, as safetensors (string) metadata."""
    return {
        "format": FORMAT,
        "projector_type": config.projector_type,
        "scale_factor": str(config.resolved_scale_factor),
        "num_image_tokens": str(config.num_image_tokens),
        "projector_options": json.dumps(config.projector_options, sort_keys=True),
        "vision_model_type": config.vision_config.model_type,
        "vision_hidden_size": str(config.vision_config.hidden_size),
        "vision_grid_size": str(config.grid_size),
        "vision_feature_layer": str(
            config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
        ),
        "multi_level_layers": json.dumps(config.resolved_multi_level_layers),
        "text_hidden_size": str(config.text_config.hidden_size),
    }


def trained_projector(model: nn.Module) -> nn.Module:
    """The projector being trained, through a peft wrapper (``modules_to_save`` copy) if any."""
    base = unwrap_peft_model(model)
    projector = base.projector
    copies = getattr(projector, "modules_to_save", None)
    if copies is not None:
        active = getattr(projector, "active_adapters", None) or ["default"]
        projector = copies[active[0]]
    return projector


def _is_partitioned(parameters: list[nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in parameters)


@contextlib.contextmanager
def gathered(module: nn.Module, modify: bool) -> Iterator[bool]:
    """Full parameters of ``module`` inside the block; yields whether this rank may write them."""
    parameters = list(module.parameters())
    if not _is_partitioned(parameters):
        yield True
        return
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None):
        yield dist.get_rank() == 0


def save_projector(model: nn.Module, path: str | Path, *, write: bool = True) -> Path:
    """Write the projector and its metadata where ``write`` (in a distributed run: the saving
    process; under ZeRO-3 the gathering rank 0). Every rank must call it: ZeRO-3 gathers the
    parameters collectively."""
    path = Path(path)
    base = unwrap_peft_model(model)
    projector = trained_projector(model)
    with gathered(projector, modify=False) as is_writer:
        if is_writer and write:
            tensors = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata=projector_metadata(base.config))
    return path


def load_projector(model: nn.Module, path: str | Path) -> None:
    """Load a projector file into ``model`` after checking it was trained for this geometry.

    Also accepts LLaVA's ``mm_projector.bin`` (keys ``model.mm_projector.*``), read with
    ``torch.load(weights_only=True)``; it has no metadata, so only shapes are checked.
    """
    path = Path(path)
    base = unwrap_peft_model(model)
    projector = trained_projector(model)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        check_metadata(metadata, base.config, path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "model.mm_projector."
        tensors = {
            type(projector).reference_key_prefix + key.split(prefix, 1)[1]: value
            for key, value in raw.items()
            if prefix in key
        }
        logger.warning("%s has no metadata (LLaVA format): only parameter shapes are checked", path)
    expected = {key: tuple(shape) for key, shape in _full_shapes(projector).items()}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    if expected != found:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise ValueError(
            f"{path} does not fit this model's projector: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {[(k, found[k], expected[k]) for k in wrong]}"
        )
    with gathered(projector, modify=True) as is_writer, torch.no_grad():
        if is_writer:
            for key, parameter in list(projector.named_parameters()) + list(projector.named_buffers()):
                if key in tensors:
                    parameter.copy_(tensors[key].to(parameter.dtype))
    logger.info("loaded projector weights from %s", path)


def _full_shapes(projector: nn.Module) -> dict[str, torch.Size]:
    # ZeRO-3 keeps the full shape in ds_shape while the local tensor is empty.
    return {
        name: getattr(tensor, "ds_shape", tensor.shape)
        for name, tensor in list(projector.named_parameters()) + list(projector.named_buffers())
    }


def check_metadata(metadata: dict[str, str], config: TokenPackerLlavaConfig, path: Path) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a projector file of this project (format {metadata.get('format')!r})"
        )
    expected = projector_metadata(config)
    mismatches = [
        f"{key}: file {metadata.get(key)!r} vs model {value!r}"
        for key, value in expected.items()
        if key != "format" and metadata.get(key) != value
    ]
    if mismatches:
        raise ValueError(
            f"{path} was trained for a different setup than this model:\n  " + "\n  ".join(mismatches)
        )
