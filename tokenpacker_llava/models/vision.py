"""Vision encoders (CLIP, SigLIP) that return query-layer and multi-level patch features.

One forward computes exactly the encoder layers the projector reads (layers past the
deepest selected one are removed at build time, as are the pooling heads) and keeps only
the selected hidden states alive, instead of the full ``output_hidden_states`` tuple.

Hidden-state indices follow transformers: index 0 is the embedding output fed to the first
layer, index i the output of layer i; negative indices count from the end, so for CLIP-L
(24 layers) ``-2`` is 23 and the default multi-level layers are 12, 16, 22, 23.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from tokenpacker_llava.registry import Registry


@dataclass(frozen=True)
class VisionFamily:
    """How to run a family of transformers ViTs layer by layer.

    ``pre_norm`` names the module applied between the patch embeddings and the first
    layer; ``unused`` the modules after the encoder (final norm, pooling head) that patch
    features never pass through and that are therefore dropped.
    """

    pre_norm: str | None
    unused: tuple[str, ...]


VISION_FAMILIES: Registry[VisionFamily] = Registry("vision encoder family")
VISION_FAMILIES.add("clip_vision_model", VisionFamily(pre_norm="pre_layrnorm", unused=("post_layernorm",)))
VISION_FAMILIES.add("siglip_vision_model", VisionFamily(pre_norm=None, unused=("post_layernorm", "head")))


@dataclass
class VisionFeatures:
    """Patch features of a batch of images (prefix tokens such as CLS removed)."""

    features: torch.Tensor  # (images, grid**2, width): the query layer
    multi_level: torch.Tensor | None  # (images, grid**2, levels * width), or None if not requested


def resolve_layer(index: int, num_layers: int) -> int:
    """Map a (possibly negative) hidden-state index of a ``num_layers`` tower to 0..num_layers."""
    if not -(num_layers + 1) <= index <= num_layers:
        raise ValueError(
            f"hidden-state index {index} is out of range for a {num_layers}-layer vision tower "
            f"(valid: {-(num_layers + 1)}..{num_layers})"
        )
    return index % (num_layers + 1)


def default_multi_level_layers(num_layers: int) -> list[int]:
    """TokenPacker's levels 12, 16, 22, 23 of a 24-layer tower, scaled to ``num_layers``.

    The two shallow levels keep their relative depth (1/2 and 2/3); the two deep ones stay
    the last two before the final layer, where the query layer (-2) sits.
    """
    if num_layers < 1:
        raise ValueError(f"a vision tower needs at least one layer, got {num_layers}")
    levels = [(num_layers + 1) // 2, (2 * num_layers + 1) // 3, num_layers - 2, num_layers - 1]
    return [min(max(level, 1), num_layers) for level in levels]


def vision_config_from_pretrained(
    name_or_path: str, *, trust_remote_code: bool = False, **hub_kwargs
) -> PretrainedConfig:
    """The vision config of a hub id or folder holding a vision model or a full CLIP/SigLIP."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs)
    config = getattr(config, "vision_config", None) or config
    VISION_FAMILIES.get(config.model_type)  # fail early, naming the supported families
    return config


class VisionEncoder(nn.Module):
    """Wraps a transformers vision model; ``forward`` returns ``VisionFeatures``."""

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        feature_layer: int = -2,
        multi_level_layers: Sequence[int] | None = (),
        model: PreTrainedModel | None = None,
    ) -> None:
        """``multi_level_layers``: hidden-state indices, () for none, None for the default levels."""
        super().__init__()
        self.family = VISION_FAMILIES.get(config.model_type)
        self.config = config
        num_layers = config.num_hidden_layers
        self.feature_layer = resolve_layer(feature_layer, num_layers)
        if multi_level_layers is None:
            multi_level_layers = default_multi_level_layers(num_layers)
        self.multi_level_layers = tuple(resolve_layer(i, num_layers) for i in multi_level_layers)
        self.model = model if model is not None else AutoModel.from_config(config)
        # Drop what patch features never pass through: later layers and pooling heads.
        deepest = max((self.feature_layer, *self.multi_level_layers))
        del self.model.encoder.layers[deepest:]
        for name in self.family.unused:
            if hasattr(self.model, name):
                delattr(self.model, name)
        embeddings = self.model.embeddings
        self.num_prefix_tokens = embeddings.num_positions - embeddings.num_patches
        self.grid_size = config.image_size // config.patch_size

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        feature_layer: int = -2,
        multi_level_layers: Sequence[int] | None = (),
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **hub_kwargs,
    ) -> VisionEncoder:
        config = vision_config_from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs
        )
        model = AutoModel.from_pretrained(
            name_or_path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **hub_kwargs
        )
        return cls(config, feature_layer=feature_layer, multi_level_layers=multi_level_layers, model=model)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor, with_multi_level: bool = True) -> VisionFeatures:
        model = self.model
        wanted = {self.feature_layer}
        if with_multi_level:
            wanted.update(self.multi_level_layers)
        hidden = model.embeddings(pixel_values.to(self.dtype))
        if self.family.pre_norm is not None:
            hidden = getattr(model, self.family.pre_norm)(hidden)
        kept = {0: hidden} if 0 in wanted else {}
        last = max(wanted)
        for index, layer in enumerate(model.encoder.layers[:last], start=1):
            hidden = layer(hidden, None)
            if index in wanted:
                kept[index] = hidden
        prefix = self.num_prefix_tokens
        features = kept[self.feature_layer][:, prefix:]
        multi_level = None
        if with_multi_level and self.multi_level_layers:
            multi_level = torch.cat([kept[i][:, prefix:] for i in self.multi_level_layers], dim=-1)
        return VisionFeatures(features=features, multi_level=multi_level)
