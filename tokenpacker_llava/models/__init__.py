"""Model parts: vision encoders, projectors, and the composed TokenPacker-LLaVA model."""

# Imported for its registration of the ``sdpa_varlen`` attention backend with transformers.
from tokenpacker_llava.models import attention  # noqa: F401
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
