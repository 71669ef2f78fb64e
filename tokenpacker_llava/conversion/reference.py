"""Convert a LLaVA / TokenPacker reference checkpoint folder into this project's format.

The reference layout (``LlavaLlamaForCausalLM``): a config.json holding the LLM's keys plus
``mm_*`` keys, weights ``model.mm_projector.*`` (projector), ``model.*`` and ``lm_head.*``
(the LLM), the vision tower loaded separately from ``mm_vision_tower``, and a Llama
tokenizer. The output is a ``TokenPackerLlavaForConditionalGeneration`` folder: config,
safetensors shards, tokenizer with ``<image>`` added, and the image processor.

Weights are read as safetensors or, for ``*.bin``, with ``torch.load(weights_only=True)``
(no arbitrary unpickling), and written shard by shard without instantiating the model.

TokenPacker-HD checkpoints (``image_aspect_ratio: "slice"``) keep slice mode, with ``patch_num``
(the reference's default 9 when the config lacks it) and the separator ids the reference
effectively used: it looked ``,`` and ``\n`` up with ``convert_tokens_to_ids``, which for a
Llama tokenizer gives the ``,`` piece and, having no ``\n`` piece, the ``<unk>`` id. The released
HD models were trained with ``<unk>`` after every tile row, so the converted config says so.

The projector type is read from the weights, not trusted from ``mm_projector_type``: the reference's
projector factory ignores that key and always builds TokenPacker, and its training scripts pass
``--mm_projector_type mlp2x_gelu``, so a TokenPacker checkpoint may say ``mlp2x_gelu``. TokenPacker's
scale factor cannot be read from its weights (they do not depend on it): the config's
``scale_factor``, else the default 2 with a warning.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, GenerationConfig

from tokenpacker_llava.models.configuration import SLICE_PATCH_NUMS, TokenPackerLlavaConfig
from tokenpacker_llava.models.modeling import TokenPackerLlavaForConditionalGeneration
from tokenpacker_llava.models.projectors import PROJECTORS
from tokenpacker_llava.models.vision import VisionEncoder
from tokenpacker_llava.tokenization import DEFAULT_IMAGE_TOKEN, ensure_image_token

logger = logging.getLogger(__name__)

# Reference `architectures` -> the transformers model_type of its LLM.
REFERENCE_ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaMptForCausalLM": "mpt",
    "LlavaQwen2ForCausalLM": "qwen2",
    "LlavaQwenForCausalLM": "qwen2",
}
# Keys of the reference config that describe the multimodal wrapper, not the LLM.
MULTIMODAL_KEYS = {
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "scale_factor",
    "patch_num",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "use_mm_proj",
    "unfreeze_mm_vision_tower",
    "mm_patch_merge_type",
}
WRAPPER_KEYS = {"model_type", "architectures", "_name_or_path", "transformers_version", "auto_map"}
PROJECTOR_PREFIX = "model.mm_projector."
VISION_PREFIX = "model.vision_tower."
# The `model.mm_projector.*` keys (prefix stripped) of each projector a reference checkpoint holds.
_TOKENPACKER_MODULES = ("k_proj_1.0", "k_proj_1.2", "v_proj_1.0", "v_proj_1.2", "ln_q_1", "ln_k_1", "ln_v_1")
_TOKENPACKER_KEYS = {"q_proj_1.weight", "clip_attn.in_proj_weight", "clip_attn.in_proj_bias"} | {
    f"{module}.{param}"
    for module in (*_TOKENPACKER_MODULES, "clip_attn.out_proj", "mlp.0", "mlp.2")
    for param in ("weight", "bias")
}
REFERENCE_PROJECTOR_KEYS: dict[str, frozenset[str]] = {
    "tokenpacker": frozenset(_TOKENPACKER_KEYS),
    "mlp2x_gelu": frozenset({"0.weight", "0.bias", "2.weight", "2.bias"}),  # LLaVA-1.5's nn.Sequential
    "linear": frozenset({"weight", "bias"}),  # LLaVA's nn.Linear
}


class ConversionError(ValueError):
    """The source folder is not a reference checkpoint this converter understands."""


def read_reference_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json")
    config = json.loads(path.read_text())
    if "mm_projector_type" not in config and "mm_hidden_size" not in config:
        raise ConversionError(f"{path} has no mm_* keys: not a LLaVA/TokenPacker checkpoint")
    return config


def text_model_type(reference: dict[str, Any], override: str | None) -> str:
    if override:
        return override
    for arch in reference.get("architectures") or []:
        if arch in REFERENCE_ARCHITECTURES:
            return REFERENCE_ARCHITECTURES[arch]
    raise ConversionError(
        f"cannot tell the LLM type from architectures={reference.get('architectures')}; "
        f"pass --text_model_type (known: {sorted(set(REFERENCE_ARCHITECTURES.values()))})"
    )


def reference_separator_ids(tokenizer: Any) -> list[int]:
    """The (``,``, newline) ids the reference's slice mode used: ``convert_tokens_to_ids`` of the raw
    characters, which gives the unk id where the vocabulary has no such piece."""
    ids = []
    for text in (",", "\n"):
        token_id = tokenizer.convert_tokens_to_ids(text)
        if token_id is None or token_id == tokenizer.unk_token_id:
            token_id = tokenizer.unk_token_id
            if token_id is None:
                raise ConversionError(
                    f"the tokenizer has neither a {text!r} piece nor an unk token: cannot reproduce the "
                    "reference's slice-mode separators"
                )
            logger.warning(
                "slice mode: the tokenizer has no %r piece, so the reference used the unk id %d there; the "
                "converted config keeps it, as the checkpoint was trained with it",
                text,
                token_id,
            )
        ids.append(int(token_id))
    logger.info("slice mode separator ids (',', newline): %s, as the reference looked them up", ids)
    return ids


def reference_patch_num(reference: dict[str, Any], override: int | None) -> int:
    """``patch_num`` of a slice-mode checkpoint: the override, the config's, or the reference's default 9."""
    value = override if override is not None else reference.get("patch_num")
    if value is None:
        logger.warning(
            "the reference config has no patch_num; using the reference's default 9 (pass --patch_num)"
        )
        value = 9
    try:
        patch_num = int(value)  # the reference reads it with getattr(config, "patch_num", "9")
    except (TypeError, ValueError):
        raise ConversionError(f"patch_num={value!r} is not an integer") from None
    if patch_num not in SLICE_PATCH_NUMS:
        raise ConversionError(f"patch_num={patch_num} is not one of {SLICE_PATCH_NUMS}")
    return patch_num


def detect_projector_type(projector_keys: Iterable[str]) -> str | None:
    """The projector whose reference state dict has exactly these keys (``model.mm_projector.``
    stripped), or None when none has."""
    keys = frozenset(projector_keys)
    return next((name for name, expected in REFERENCE_PROJECTOR_KEYS.items() if keys == expected), None)


def _same_weights(projector_type: str, detected: str) -> bool:
    """Whether ``projector_type`` stores the reference keys of ``detected`` (itself or a variant of it,
    like ``tokenpacker_single`` of ``tokenpacker``)."""
    if projector_type not in PROJECTORS:
        return False
    cls, detected_cls = PROJECTORS.get(projector_type), PROJECTORS.get(detected)
    return issubclass(cls, detected_cls) and cls.reference_key_prefix == detected_cls.reference_key_prefix


def resolve_projector_type(
    reference: dict[str, Any], projector_keys: Iterable[str], override: str | None = None
) -> str:
    """The projector to convert to: ``override``, else the one the weights are (warning when the
    config's ``mm_projector_type`` says otherwise: the reference ignores that key), else the config's."""
    configured = reference.get("mm_projector_type")
    detected = detect_projector_type(projector_keys)
    if override:
        PROJECTORS.get(override)  # an unknown name lists the known ones
        if detected is not None and not _same_weights(override, detected):
            logger.warning(
                "projector_type=%r overrides the checkpoint, whose mm_projector weights are %r's",
                override,
                detected,
            )
        return override
    if detected is None:
        return configured or "linear"
    if configured is not None and _same_weights(configured, detected):
        return configured
    if configured is not None:
        logger.warning(
            "config.json says mm_projector_type=%r, but the mm_projector weights are %r's (the reference "
            "code ignores mm_projector_type and always builds TokenPacker); converting as %r "
            "(pass --projector_type to override)",
            configured,
            detected,
            detected,
        )
    return detected


def resolve_scale_factor(
    reference: dict[str, Any], projector_type: str, grid_size: int, override: int | None = None
) -> int | None:
    """The converted config's ``scale_factor``: None for projectors that keep every token, else
    ``override``, the config's, or the projector's default, with a warning, since the weights do not
    depend on it and so cannot tell."""
    cls = PROJECTORS.get(projector_type)
    if cls.default_scale_factor == 1:
        if override not in (None, 1):
            raise ConversionError(f"--scale_factor does not apply to the {projector_type!r} projector")
        return None
    value = override if override is not None else reference.get("scale_factor")
    if value is None:
        default = cls.default_scale_factor
        logger.warning(
            "config.json has no scale_factor: assuming %s's default %d (%d visual tokens); the weights do "
            "not depend on it, so if the checkpoint was trained with another one pass --scale_factor",
            projector_type,
            default,
            cls.output_tokens(grid_size, default),
        )
        return default
    try:
        scale = int(value)
    except (TypeError, ValueError):
        raise ConversionError(f"scale_factor={value!r} is not an integer") from None
    try:
        cls.check_geometry(grid_size, scale)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    return scale


def build_config(
    reference: dict[str, Any],
    vision: VisionEncoder,
    *,
    text_type: str,
    image_token_id: int | None,
    tokenizer: Any = None,
    patch_num: int | None = None,
    projector_type: str | None = None,
    scale_factor: int | None = None,
) -> TokenPackerLlavaConfig:
    """The converted config; ``projector_type`` (default: the config's ``mm_projector_type``) and
    ``scale_factor`` (default: the config's) as resolved by the caller."""
    select_feature = reference.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise ConversionError(f"mm_vision_select_feature={select_feature!r} is not supported (only 'patch')")
    if reference.get("mm_use_im_start_end") or reference.get("mm_use_im_patch_token"):
        raise ConversionError(
            "checkpoints using mm_use_im_start_end / mm_use_im_patch_token are not supported"
        )
    projector_type = projector_type or reference.get("mm_projector_type", "linear")
    PROJECTORS.get(projector_type)
    if reference.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(
            f"mm_hidden_size={reference['mm_hidden_size']} but the vision tower has width {vision.hidden_size}"
        )
    text_kwargs = {
        key: value
        for key, value in reference.items()
        if not key.startswith("mm_") and key not in MULTIMODAL_KEYS and key not in WRAPPER_KEYS
    }
    text_config = AutoConfig.for_model(text_type, **text_kwargs)
    image_aspect_ratio = reference.get("image_aspect_ratio", "pad")
    if image_aspect_ratio not in ("pad", "resize", "slice"):
        raise ConversionError(f"image_aspect_ratio={image_aspect_ratio!r} is not supported")
    slicing: dict[str, Any] = {}
    if image_aspect_ratio == "slice":
        slicing["patch_num"] = reference_patch_num(reference, patch_num)
        if tokenizer is not None:
            slicing["slice_separator_ids"] = reference_separator_ids(tokenizer)
        else:
            logger.warning("slice mode without a tokenizer: set slice_separator_ids in the converted config")
    return TokenPackerLlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        projector_type=projector_type,
        scale_factor=resolve_scale_factor(reference, projector_type, vision.grid_size, scale_factor),
        vision_feature_layer=reference.get("mm_vision_select_layer", -2),
        multi_level_layers=list(vision.multi_level_layers) or None,
        image_token_id=image_token_id,
        image_aspect_ratio=image_aspect_ratio,
        dtype=reference.get("torch_dtype") or reference.get("dtype"),
        **slicing,
    )


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, shards in index order."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [src / shard for shard in shards]
        if (src / single_name).is_file():
            return [src / single_name]
    raise ConversionError(f"{src} holds no model.safetensors or pytorch_model.bin (sharded or not)")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            shard = load_file(path)
        else:
            # weights_only: tensors and containers only, never arbitrary unpickled code.
            # mmap needs the zip format of torch >= 1.6; legacy pickles load without it.
            shard = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        yield from shard.items()


def rename_key(key: str, projector_prefix: str) -> str | None:
    """Reference key -> our key; None for vision-tower keys (the tower comes from its own folder)."""
    if key.startswith(PROJECTOR_PREFIX):
        return "projector." + projector_prefix + key[len(PROJECTOR_PREFIX) :]
    if key.startswith(VISION_PREFIX):
        return None
    if key.startswith("model."):
        return "language_model." + key
    if key.startswith("lm_head."):
        return "language_model." + key
    raise ConversionError(f"unexpected key {key!r} in the reference checkpoint")


def convert_reference_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    vision_tower: str | None = None,
    text_model_type_override: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
    trust_remote_code: bool = False,
    verify: bool = True,
    patch_num: int | None = None,
    projector_type: str | None = None,
    scale_factor: int | None = None,
) -> Path:
    """Convert ``src`` (reference layout) into ``dst`` (this project's format) and verify it loads.

    ``vision_tower`` overrides the config's ``mm_vision_tower`` (a hub id or local folder);
    ``patch_num`` overrides a slice-mode checkpoint's (whose config may lack it); ``projector_type``
    overrides the projector read from the weights' keys (see ``resolve_projector_type``), and
    ``scale_factor`` the config's (a TokenPacker config may lack it: the default 2 is then assumed).
    """
    src, dst = Path(src), Path(dst)
    reference = read_reference_config(src)
    tower = vision_tower or reference.get("mm_vision_tower")
    if not tower:
        raise ConversionError("the config names no mm_vision_tower; pass --vision_tower")

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        # Cast as each shard is read, so only one copy of the weights is ever held.
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    weights = {key: cast(tensor) for key, tensor in iter_tensors(weight_files(src))}
    projector_type = resolve_projector_type(
        reference,
        [key[len(PROJECTOR_PREFIX) :] for key in weights if key.startswith(PROJECTOR_PREFIX)],
        projector_type,
    )
    projector_cls = PROJECTORS.get(projector_type)
    logger.info("loading vision tower %s", tower)
    vision = VisionEncoder.from_pretrained(
        tower,
        feature_layer=reference.get("mm_vision_select_layer", -2),
        # None: the default levels, i.e. the reference's 12, 16, 22, 23 for CLIP-L.
        multi_level_layers=None if projector_cls.uses_multi_level else (),
        trust_remote_code=trust_remote_code,
    )

    tokenizer = None
    image_token_id = None
    if (src / "tokenizer_config.json").is_file() or (src / "tokenizer.model").is_file():
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        image_token_id = ensure_image_token(tokenizer, DEFAULT_IMAGE_TOKEN)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token  # as the reference trains
    else:
        logger.warning("%s has no tokenizer; set image_token_id in the converted config yourself", src)

    config = build_config(
        reference,
        vision,
        text_type=text_model_type(reference, text_model_type_override),
        image_token_id=image_token_id,
        tokenizer=tokenizer,
        patch_num=patch_num,
        projector_type=projector_type,
        scale_factor=scale_factor,
    )

    state_dict = {
        f"vision_tower.model.{key}": cast(tensor) for key, tensor in vision.model.state_dict().items()
    }
    for key in list(weights):
        new_key = rename_key(key, projector_cls.reference_key_prefix)
        tensor = weights.pop(key)
        if new_key is not None:
            state_dict[new_key] = tensor
    if dtype is not None:
        config.dtype = dtype

    dst.mkdir(parents=True, exist_ok=True)
    config.architectures = [TokenPackerLlavaForConditionalGeneration.__name__]
    config.save_pretrained(dst)
    GenerationConfig.from_model_config(config.text_config).save_pretrained(dst)
    save_torch_state_dict(state_dict, dst, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    try:
        AutoImageProcessor.from_pretrained(tower, trust_remote_code=trust_remote_code).save_pretrained(dst)
    except OSError as error:
        logger.warning("no image processor saved (%s has none: %s)", tower, error)
    if verify:
        verify_loads(dst)
    return dst


def verify_loads(dst: Path) -> None:
    """Load the converted folder strictly: every weight used, none missing."""
    _, info = TokenPackerLlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = {kind: keys for kind, keys in info.items() if keys and kind in kinds}
    if problems:
        raise ConversionError(f"the converted checkpoint does not load cleanly: {problems}")
    logger.info("converted checkpoint written to %s and verified", dst)
