"""Model parts: vision encoders, projectors, and the composed TokenPacker-LLaVA model."""

from tokenpacker_llava.models.configuration import TokenPackerLlavaConfig
from tokenpacker_llava.models.modeling import (
    TokenPackerLlavaForConditionalGeneration,
    TokenPackerLlavaPreTrainedModel,
)

__all__ = [
    "TokenPackerLlavaConfig",
    "TokenPackerLlavaForConditionalGeneration",
    "TokenPackerLlavaPreTrainedModel",
]
