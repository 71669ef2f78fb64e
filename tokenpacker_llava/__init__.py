"""tokenpacker_llava: train LLaVA-style multimodal LLMs around the TokenPacker projector."""

from transformers import AutoConfig, AutoModelForImageTextToText

from tokenpacker_llava.models import (
    TokenPackerLlavaConfig,
    TokenPackerLlavaForConditionalGeneration,
    TokenPackerLlavaPreTrainedModel,
)

__version__ = "0.1.0"

# Lets AutoConfig / AutoModelForImageTextToText open saved folders by their model_type.
AutoConfig.register(TokenPackerLlavaConfig.model_type, TokenPackerLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(
    TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration, exist_ok=True
)

__all__ = [
    "TokenPackerLlavaConfig",
    "TokenPackerLlavaForConditionalGeneration",
    "TokenPackerLlavaPreTrainedModel",
]
