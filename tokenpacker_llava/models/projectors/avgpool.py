"""``avgpool_mlp``: the paper's "Avg-Pool" baseline projector.

Average-pools every ``s x s`` region of the patch grid into one token, then applies
LLaVA-1.5's two-layer MLP. It compresses exactly as much as TokenPacker at the same scale
factor (``(grid/s)**2`` tokens) but with no learned mixing inside a region, which is what
the comparison in the paper isolates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector


@PROJECTORS.register("avgpool_mlp")
class AvgPoolMLPProjector(Projector):
    """avg_pool2d(kernel = stride = s) over the patch map -> Linear(in, H) -> GELU -> Linear(H, H).

    Args:
        in_dim: vision width C.
        out_dim: LLM hidden size H.
        grid_size: patches per side of the input map (24 for CLIP-L/336).
        multi_level_dim: unused (single-level projector); accepted for a uniform interface.
        scale_factor: s; 2/3/4 on a 24x24 grid give 144/64/36 tokens.
    """

    default_scale_factor = 2

    def __init__(self, **geometry: int | None) -> None:
        super().__init__(**geometry)
        self.mlp = nn.Sequential(
            nn.Linear(self.in_dim, self.out_dim), nn.GELU(), nn.Linear(self.out_dim, self.out_dim)
        )

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, G*G, C) row-major tokens -> (B, g*g, C): the mean of each ``s x s`` region."""
        s = self.scale_factor
        return self.from_map(F.avg_pool2d(self.to_map(features), kernel_size=s, stride=s))

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        # Pool before the MLP: same result for the first (linear) layer, s*s times fewer FLOPs.
        return self.mlp(self.pool(features))
