"""``TokenPackerLlavaConfig``: a vision config, a text config and the projector settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from tokenpacker_llava.models.projectors import PROJECTORS, Projector
from tokenpacker_llava.models.vision import VISION_FAMILIES, default_multi_level_layers, resolve_layer

# CLIP ViT-L/14 at 336 px, the tower of the published models.
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}

IMAGE_ASPECT_RATIOS = ("pad", "resize", "slice")
# Tile budgets of the published slice-mode candidate lists (data/slicing.py holds the lists; kept
# apart so that this module, which the remote code bundles, needs nothing from the data pipeline).
SLICE_PATCH_NUMS = (9, 16, 25)


class TokenPackerLlavaConfig(PretrainedConfig):
    """Configuration of ``TokenPackerLlavaForConditionalGeneration``.

    Args:
        vision_config: config (or dict) of a CLIP or SigLIP vision tower; CLIP-L/336 by default.
        text_config: config (or dict) of any causal LM known to ``AutoModelForCausalLM``.
        projector_type: a name registered in ``PROJECTORS`` (``tokenpacker``, ``mlp2x_gelu`` ...).
        scale_factor: the projector's downsampling s (None: the projector's default).
        projector_options: extra keyword arguments of the projector (e.g. ``num_heads``).
        vision_feature_layer: hidden-state index of the query-layer features (-2 as LLaVA).
        multi_level_layers: hidden-state indices concatenated as multi-level features, for
            projectors that read them; None scales 12/16/22/23 of a 24-layer tower.
        image_token_id: id of the ``<image>`` placeholder; may lie outside the embedding
            table, since placeholder embeddings are always replaced by image features.
        image_aspect_ratio: image preprocessing, ``pad`` (LLaVA-1.5), ``resize`` or ``slice``
            (TokenPacker-HD: tiles plus a global view, each ``num_image_tokens`` tokens).
        patch_num: slice mode's tile budget, 9, 16 or 25 (the reference's default 9).
        slice_separator_ids: slice mode's [``,`` token id, newline token id], placed between the
            tiles in ``input_ids``; set from the tokenizer when training starts.
    """

    model_type = "tokenpacker_llava"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L_336
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    projector_type: str = "tokenpacker"
    scale_factor: int | None = None
    projector_options: dict | None = None
    vision_feature_layer: int = -2
    multi_level_layers: list[int] | None = None
    image_token_id: int | None = None
    image_token: str = "<image>"
    image_aspect_ratio: str = "pad"
    patch_num: int = 9
    slice_separator_ids: list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.projector_options is None:
            self.projector_options = {}
        if self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = True
        VISION_FAMILIES.get(self.vision_config.model_type)
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {self.image_aspect_ratio!r}"
            )
        if self.patch_num not in SLICE_PATCH_NUMS:
            raise ValueError(f"patch_num must be one of {SLICE_PATCH_NUMS}, got {self.patch_num!r}")
        if self.slice_separator_ids is not None:
            ids = list(self.slice_separator_ids)
            if len(ids) != 2 or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
            ):
                raise ValueError(
                    f"slice_separator_ids must be [comma id, newline id], got {self.slice_separator_ids!r}"
                )
            self.slice_separator_ids = ids
        # Resolving these raises a clear error for an unknown projector, a grid the scale
        # does not divide, or a layer index the tower does not have.
        self.num_image_tokens  # noqa: B018
        self.resolved_multi_level_layers  # noqa: B018
        resolve_layer(self.vision_feature_layer, self.vision_config.num_hidden_layers)

    @property
    def projector_class(self) -> type[Projector]:
        return PROJECTORS.get(self.projector_type)

    @property
    def grid_size(self) -> int:
        """Patches per side of the vision tower's feature map (24 for CLIP-L/336)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def resolved_scale_factor(self) -> int:
        return self.projector_class.default_scale_factor if self.scale_factor is None else self.scale_factor

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image view: how far one ``<image>`` expands outside slice mode, and the
        tokens of each tile and of the global view in slice mode."""
        return self.projector_class.output_tokens(self.grid_size, self.scale_factor)

    @property
    def resolved_multi_level_layers(self) -> list[int]:
        """Absolute hidden-state indices of the multi-level features ([] if the projector reads none)."""
        if not self.projector_class.uses_multi_level:
            return []
        num_layers = self.vision_config.num_hidden_layers
        layers = self.multi_level_layers
        if layers is None:
            layers = default_multi_level_layers(num_layers)
        if not layers:
            raise ValueError(f"projector {self.projector_type!r} needs at least one multi-level layer")
        return [resolve_layer(i, num_layers) for i in layers]

    @property
    def multi_level_dim(self) -> int:
        return self.vision_config.hidden_size * max(1, len(self.resolved_multi_level_layers))
