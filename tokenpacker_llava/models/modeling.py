"""``TokenPackerLlavaForConditionalGeneration``: vision encoder -> projector -> causal LM.

One class for every combination: the vision tower is any registered ViT family, the
projector any registered projector, the LLM anything ``AutoModelForCausalLM`` builds
(Llama/Vicuna, Mistral, Qwen2 ...), with its own head, loss and cache. Each ``<image>``
placeholder in ``input_ids`` must already be expanded to ``config.num_image_tokens`` copies;
images are consumed in placeholder order across the batch. Slice mode (TokenPacker-HD) needs
nothing more here: each view (tile or global view) of an image is one entry of ``pixel_values``
and one run of placeholders, and the ``,``/newline separators between them are ordinary token
ids in ``input_ids`` (``data.visual_inputs``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from tokenpacker_llava.models.configuration import TokenPackerLlavaConfig
from tokenpacker_llava.models.loss import (
    chunked_causal_lm_loss,
    chunked_loss_unsupported,
    register_with_zero3,
    supports_chunked_loss,
)
from tokenpacker_llava.models.projectors import Projector, build_projector
from tokenpacker_llava.models.vision import VisionEncoder

logger = logging.getLogger(__name__)


class TokenPackerLlavaPreTrainedModel(PreTrainedModel):
    config_class = TokenPackerLlavaConfig  # explicit: annotations are strings under `from __future__`
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # The vision tower and the LLM are transformers models and initialize themselves;
        # the projector owns its (reference) init scheme.
        if isinstance(module, Projector):
            module.reset_parameters()


class TokenPackerLlavaForConditionalGeneration(TokenPackerLlavaPreTrainedModel, GenerationMixin):
    def __init__(
        self,
        config: TokenPackerLlavaConfig,
        *,
        vision_model: PreTrainedModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        """Build from ``config``; ``vision_model``/``language_model`` reuse already loaded
        pretrained parts (see ``from_pretrained_parts``) instead of random ones."""
        super().__init__(config)
        self.vision_tower = VisionEncoder(
            config.vision_config,
            feature_layer=config.vision_feature_layer,
            multi_level_layers=config.resolved_multi_level_layers,
            model=vision_model,
        )
        self.projector = build_projector(
            config.projector_type,
            in_dim=config.vision_config.hidden_size,
            out_dim=config.text_config.hidden_size,
            grid_size=config.grid_size,
            multi_level_dim=config.multi_level_dim,
            scale_factor=config.scale_factor,
            **config.projector_options,
        )
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        # A training setting, not part of the architecture: not saved with the config.
        self.loss_chunk_size: int | None = None
        self.post_init()

    @classmethod
    def from_pretrained_parts(
        cls,
        language_model: str,
        vision_tower: str,
        *,
        image_token_id: int,
        projector_type: str = "tokenpacker",
        scale_factor: int | None = None,
        vision_feature_layer: int = -2,
        multi_level_layers: list[int] | None = None,
        projector_options: dict | None = None,
        image_aspect_ratio: str = "pad",
        patch_num: int = 9,
        slice_separator_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        llm_quantization_config: Any | None = None,
    ) -> TokenPackerLlavaForConditionalGeneration:
        """The start of training: a pretrained LLM and vision tower joined by a new projector.

        ``llm_quantization_config`` (e.g. bitsandbytes 4-bit for QLoRA) applies to the LLM only.
        """
        from transformers import AutoModel

        from tokenpacker_llava.models.vision import vision_config_from_pretrained

        common = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        if attn_implementation is not None:
            common["attn_implementation"] = attn_implementation
        llm = AutoModelForCausalLM.from_pretrained(
            language_model, quantization_config=llm_quantization_config, **common
        )
        vision_config = vision_config_from_pretrained(vision_tower, trust_remote_code=trust_remote_code)
        vision = AutoModel.from_pretrained(vision_tower, config=vision_config, **common)
        config = TokenPackerLlavaConfig(
            vision_config=vision.config,
            text_config=llm.config,
            projector_type=projector_type,
            scale_factor=scale_factor,
            vision_feature_layer=vision_feature_layer,
            multi_level_layers=multi_level_layers,
            projector_options=projector_options or {},
            image_token_id=image_token_id,
            image_aspect_ratio=image_aspect_ratio,
            patch_num=patch_num,
            slice_separator_ids=slice_separator_ids,
        )
        # The parts were loaded with the requested (or default) backend; keep it for the whole.
        config._attn_implementation = attn_implementation or llm.config._attn_implementation
        model = cls(config, vision_model=vision, language_model=llm)
        if dtype is not None:
            model.projector.to(dtype)
        model.generation_config = llm.generation_config
        return model

    # Embedding accessors delegate to the LLM so resize_token_embeddings, peft and
    # generation utilities work unchanged.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def use_chunked_loss(self, chunk_size: int | None) -> None:
        """Train with ``chunked_causal_lm_loss`` (LM head on target positions only, ``chunk_size``
        tokens at a time, never the full logits) instead of the LLM's own loss; None: the LLM's.

        Applies to training forwards with labels, and to evaluation forwards called with
        ``loss_only=True``; other forwards and generation return logits as usual.
        """
        if chunk_size is not None:
            if chunk_size <= 0:
                raise ValueError(f"the loss chunk size must be positive, got {chunk_size}")
            reason = chunked_loss_unsupported(self.config.text_config) or supports_chunked_loss(
                self.get_output_embeddings()
            )
            if reason is not None:
                raise ValueError(f"the chunked loss cannot stand in for this LLM's loss: {reason}")
            register_with_zero3(self, self.get_output_embeddings())
        self.loss_chunk_size = chunk_size

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, num_image_tokens, LLM hidden size)."""
        vision = self.vision_tower(pixel_values, with_multi_level=self.projector.uses_multi_level)
        dtype = next(self.projector.parameters(), vision.features).dtype
        multi_level = vision.multi_level.to(dtype) if vision.multi_level is not None else None
        return self.projector(vision.features.to(dtype), multi_level=multi_level)

    def _zero_image_contribution(self, like: torch.Tensor) -> torch.Tensor:
        """0 x the features of a blank image, for text-only training batches.

        Every rank then runs the vision tower and projector at every step: under ZeRO-3 a rank
        that skipped them would leave the others waiting in their parameter all-gathers (a
        hang), and under DDP the projector's parameters would be unused (an error).
        """
        vision = self.config.vision_config
        blank = like.new_zeros(1, vision.num_channels, vision.image_size, vision.image_size)
        return self.get_image_features(blank).sum().to(like.dtype) * 0.0

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.config.image_token_id

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by projected image features."""
        image_mask = self.image_token_mask(input_ids)
        # Placeholder ids may lie outside the embedding table; their rows are overwritten anyway.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        num_placeholders = int(image_mask.sum())
        if pixel_values is None:
            if num_placeholders:
                raise ValueError(
                    f"input_ids contain {num_placeholders} image placeholder tokens but no pixel_values were given"
                )
            if self.training and torch.is_grad_enabled():
                inputs_embeds = inputs_embeds + self._zero_image_contribution(inputs_embeds)
            return inputs_embeds
        if self.config.image_token_id is None:
            raise ValueError("pixel_values were given but config.image_token_id is not set")
        image_features = self.get_image_features(pixel_values)
        num_features = image_features.shape[0] * image_features.shape[1]
        if num_placeholders != num_features:
            what = (
                "each view of an image (tile or global view) must have its run of "
                f"{self.num_image_tokens} placeholders and be one entry of pixel_values"
                if self.config.image_aspect_ratio == "slice"
                else f"each <image> must be expanded to {self.num_image_tokens} tokens and match one image"
            )
            raise ValueError(
                f"image placeholder/feature mismatch: input_ids contain {num_placeholders} image tokens but "
                f"{image_features.shape[0]} image(s) x {image_features.shape[1]} tokens = {num_features} features; "
                f"{what}"
            )
        features = image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_only: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The LLM's forward on the embedded text and images.

        ``loss_only``: the caller reads only the loss (e.g. an evaluation loop), so with labels and
        a chunk size set (``use_chunked_loss``) no logits are computed, as in training.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids to locate the image placeholders")
        if use_cache is None and (labels is not None or self.training):
            # Training needs no KV cache, and a cache would stop transformers from building the
            # per-sample mask of packed rows (it only does so for cache-free forwards).
            use_cache = False
        if labels is not None and self.loss_chunk_size is not None and (self.training or loss_only):
            return self._chunked_loss_forward(inputs_embeds, attention_mask, position_ids, labels, **kwargs)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _chunked_loss_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        labels: torch.LongTensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The LLM's decoder, then the loss from its hidden states; no logits are returned."""
        if "shift_labels" in kwargs:
            # transformers' loss would take them instead of shifting labels; the decoder would
            # silently ignore them.
            raise ValueError("shift_labels are not supported with the chunked loss; pass labels")
        outputs = self.language_model.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        )
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state,
            self.get_output_embeddings(),
            labels,
            chunk_size=self.loss_chunk_size,
            num_items_in_batch=num_items_in_batch,
        )
        return CausalLMOutputWithPast(
            loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
