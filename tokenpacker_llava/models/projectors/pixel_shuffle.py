"""``pixel_shuffle``: InternVL-style space-to-depth projector.

Every ``s x s`` region of the patch grid becomes one token whose channels are the region's
``s*s`` tokens concatenated, so nothing is averaged away; InternVL's ``mlp1`` (LayerNorm,
then a two-layer GELU MLP) maps the ``s*s*C`` wide token to the LLM width.

Channel order of a packed token (fixed, and the one the MLP's first layer is trained on):
the region's tokens in row-major order, each contributing its C channels contiguously, i.e.
channel ``(dy * s + dx) * C + c`` holds channel ``c`` of the patch at row offset ``dy`` and
column offset ``dx`` within the region. This differs from InternVL's own ``pixel_shuffle``
permutation (which interleaves via two reshapes and a transpose), so InternVL ``mlp1``
weights do not load here; the information content is identical.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector


@PROJECTORS.register("pixel_shuffle")
class PixelShuffleProjector(Projector):
    """space-to-depth(s) -> LayerNorm(s*s*C) -> Linear(s*s*C, H) -> GELU -> Linear(H, H).

    Args:
        in_dim: vision width C.
        out_dim: LLM hidden size H.
        grid_size: patches per side of the input map (24 for CLIP-L/336).
        multi_level_dim: unused (single-level projector); accepted for a uniform interface.
        scale_factor: s; 2/3/4 on a 24x24 grid give 144/64/36 tokens of width 4C/9C/16C.
        layer_norm_eps: nn.LayerNorm's default 1e-5, as InternVL's ``mlp1``.
    """

    default_scale_factor = 2

    def __init__(self, *, layer_norm_eps: float = 1e-5, **geometry: int | None) -> None:
        super().__init__(**geometry)
        packed_dim = self.in_dim * self.scale_factor**2
        self.norm = nn.LayerNorm(packed_dim, eps=layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(packed_dim, self.out_dim), nn.GELU(), nn.Linear(self.out_dim, self.out_dim)
        )
        # PyTorch's default inits (Projector.reset_parameters), as InternVL's mlp1.

    def space_to_depth(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G*G, C) row-major tokens -> (B, g*g, s*s*C), regions in row-major order.

        Within a packed token the region's patches come in row-major order (see the module
        docstring), each with its C channels contiguous.
        """
        return self.regions(features).flatten(2)

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        return self.mlp(self.norm(self.space_to_depth(features)))
