"""Token-preserving projectors of LLaVA: ``mlp2x_gelu`` (LLaVA-1.5), ``linear`` and ``identity``."""

from __future__ import annotations

import torch
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, TokenPreservingProjector


@PROJECTORS.register("mlp2x_gelu")
class MLP2xGELUProjector(TokenPreservingProjector):
    """Linear(in, H) -> GELU -> Linear(H, H), LLaVA-1.5's projector (576 tokens at 336 px)."""

    reference_key_prefix = "layers."  # LLaVA-1.5 stores the bare nn.Sequential: `mm_projector.0.*`

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layers = nn.Sequential(
            nn.Linear(self.in_dim, self.out_dim), nn.GELU(), nn.Linear(self.out_dim, self.out_dim)
        )

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        return self.layers(features)


@PROJECTORS.register("linear")
class LinearProjector(TokenPreservingProjector):
    """A single Linear(in, H), the original LLaVA projector."""

    reference_key_prefix = "proj."  # LLaVA stores the bare nn.Linear: `mm_projector.weight`

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.proj = nn.Linear(self.in_dim, self.out_dim)

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        return self.proj(features)


@PROJECTORS.register("identity")
class IdentityProjector(TokenPreservingProjector):
    """Passes features through; only valid when the encoder width equals the LLM width."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.in_dim != self.out_dim:
            raise ValueError(
                f"identity projector needs in_dim == out_dim, got {self.in_dim} and {self.out_dim}"
            )

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        return features
