"""The projector interface and the registry every projector registers in.

A projector maps the vision tower's patch features of one image, shape
``(batch, grid_size**2, in_dim)`` in row-major grid order, to ``(batch, num_tokens, out_dim)``
LLM input embeddings. Projectors that read multi-level features (TokenPacker) also take
``multi_level`` of shape ``(batch, grid_size**2, multi_level_dim)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tokenpacker_llava.registry import Registry

PROJECTORS: Registry[type[Projector]] = Registry("projector")


class Projector(nn.Module):
    """Base class: holds the shared geometry and validates inputs.

    Subclasses set ``uses_multi_level`` when they read multi-level features (so the vision
    encoder only computes and keeps those hidden states when needed) and
    ``default_scale_factor`` (1 for token-preserving projectors).
    """

    uses_multi_level: ClassVar[bool] = False
    default_scale_factor: ClassVar[int] = 1
    # Where the reference (LLaVA / TokenPacker) checkpoints' `mm_projector.*` keys live in
    # this module: `mm_projector.<key>` <-> `<reference_key_prefix><key>`.
    reference_key_prefix: ClassVar[str] = ""

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        grid_size: int,
        multi_level_dim: int | None = None,
        scale_factor: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("grid_size", grid_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        scale = self.default_scale_factor if scale_factor is None else scale_factor
        self.check_geometry(grid_size, scale)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.grid_size = grid_size
        self.multi_level_dim = multi_level_dim if multi_level_dim is not None else in_dim
        self.scale_factor = scale

    @classmethod
    def check_geometry(cls, grid_size: int, scale_factor: int) -> None:
        """Raise a clear error when ``scale_factor`` cannot be applied to a ``grid_size`` grid."""
        if not isinstance(scale_factor, int) or scale_factor < 1:
            raise ValueError(f"{cls.__name__}: scale_factor must be a positive int, got {scale_factor!r}")
        if grid_size % scale_factor != 0:
            divisors = [d for d in range(1, grid_size + 1) if grid_size % d == 0]
            raise ValueError(
                f"{cls.__name__}: a {grid_size}x{grid_size} patch grid cannot be packed with scale_factor "
                f"{scale_factor} ({grid_size} is not divisible by {scale_factor}); scale factors that "
                f"divide this grid: {divisors}"
            )

    @classmethod
    def output_tokens(cls, grid_size: int, scale_factor: int | None = None) -> int:
        """Number of visual tokens produced for one image, known without building the module."""
        scale = cls.default_scale_factor if scale_factor is None else scale_factor
        cls.check_geometry(grid_size, scale)
        return (grid_size // scale) ** 2

    @property
    def num_tokens(self) -> int:
        return self.output_tokens(self.grid_size, self.scale_factor)

    def check_input(self, features: torch.Tensor, multi_level: torch.Tensor | None) -> None:
        expected = self.grid_size**2
        if features.dim() != 3 or features.shape[1] != expected or features.shape[2] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects features of shape (batch, {expected}, {self.in_dim}) "
                f"(a {self.grid_size}x{self.grid_size} grid), got {tuple(features.shape)}"
            )
        if multi_level is not None and (
            multi_level.shape[:2] != features.shape[:2] or multi_level.shape[2] != self.multi_level_dim
        ):
            raise ValueError(
                f"{type(self).__name__} expects multi_level of shape (batch, {expected}, "
                f"{self.multi_level_dim}), got {tuple(multi_level.shape)}"
            )

    def reset_parameters(self) -> None:
        """Initialize all parameters; also called by the composed model for missing weights.

        The default is each submodule's own PyTorch init (LLaVA's and most baselines' choice).
        """
        for sub in self.modules():
            if sub is not self and hasattr(sub, "reset_parameters"):
                sub.reset_parameters()

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G*G, C) row-major tokens -> (B, C, G, G) feature map."""
        batch, _, dim = tokens.shape
        return tokens.transpose(1, 2).reshape(batch, dim, self.grid_size, self.grid_size)

    @staticmethod
    def from_map(grid: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature map -> (B, h*w, C) row-major tokens."""
        return grid.flatten(2).transpose(1, 2)

    def regions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G*G, C) row-major tokens -> (B, g*g, s*s, C): each ``s x s`` region's tokens,
        regions in row-major order and, within a region, tokens in row-major order."""
        batch, _, dim = tokens.shape
        s, g = self.scale_factor, self.grid_size // self.scale_factor
        # (B, row-block, dy, col-block, dx, C) -> (B, row-block, col-block, dy, dx, C)
        grouped = tokens.reshape(batch, g, s, g, s, dim).permute(0, 1, 3, 2, 4, 5)
        return grouped.reshape(batch, g * g, s * s, dim)

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class TokenPreservingProjector(Projector):
    """A projector that maps each patch token to one LLM token (no packing)."""

    def __init__(self, *, scale_factor: int | None = None, **geometry: int | None) -> None:
        if scale_factor not in (None, 1):
            raise ValueError(
                f"{type(self).__name__} keeps every patch token; scale_factor must be 1 or unset, got {scale_factor}"
            )
        super().__init__(scale_factor=1, **geometry)


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal Linear weights, zero biases, unit LayerNorms (the TokenPacker init)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.trunc_normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
