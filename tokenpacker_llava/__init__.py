"""tokenpacker_llava: train LLaVA-style multimodal LLMs around the TokenPacker projector."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from tokenpacker_llava.models import (
    TokenPackerLlavaConfig,
    TokenPackerLlavaForConditionalGeneration,
    TokenPackerLlavaPreTrainedModel,
)

__version__ = "0.1.0"

# Lets the Auto classes open saved folders by their model_type (the image-text-to-text model
# is also a causal LM: it generates text).
AutoConfig.register(TokenPackerLlavaConfig.model_type, TokenPackerLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(
    TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration, exist_ok=True
)
AutoModelForCausalLM.register(TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration, exist_ok=True)
AutoModel.register(TokenPackerLlavaConfig, TokenPackerLlavaForConditionalGeneration, exist_ok=True)

__all__ = [
    "TokenPackerLlavaConfig",
    "TokenPackerLlavaForConditionalGeneration",
    "TokenPackerLlavaPreTrainedModel",
]
