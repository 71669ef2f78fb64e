"""``ldpv2``: MobileVLM-v2's lightweight downsample projector (LDP-v2, arXiv 2402.03766).

Mapping to the paper / reference ``LDPNetV2Projector``:

* feature transformation: ``Linear(in, H) -> GELU -> Linear(H, H)`` on every patch token
  (``mlp`` here; the reference's ``FeatureIRLayer``);
* token reduction: average pooling of the ``G x G`` token map to ``G/s x G/s``. The reference
  uses ``AdaptiveAvgPool2d((12, 12))``, which on its 24x24 grid is exactly a 2x2 average
  pool; here ``avg_pool2d`` with kernel = stride = s makes the scale explicit and lets
  s = 3, 4 give 64, 36 tokens (the reference's ``TokenDownLayer``);
* positional information: a PEG (positional encoding generator, from CPVT), a depthwise
  3x3 convolution with padding 1 whose output is added back as a residual
  (``peg`` here; the reference's ``PosInjectLayer``).

Module names differ from the reference's nesting (``mlp.mlp.0``, ``peg.peg.0``), so its
checkpoints do not load strictly; the computation is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector


@PROJECTORS.register("ldpv2")
class LDPv2Projector(Projector):
    """MLP(in -> H -> H) per token -> avg_pool2d(s) on the map -> x + DWConv3x3(x).

    Args:
        in_dim: vision width C.
        out_dim: LLM hidden size H (also the PEG's channel count).
        grid_size: patches per side of the input map (24 for CLIP-L/336).
        multi_level_dim: unused (single-level projector); accepted for a uniform interface.
        scale_factor: s; 2/3/4 on a 24x24 grid give 144/64/36 tokens (2 is MobileVLM-v2's).
    """

    default_scale_factor = 2

    def __init__(self, **geometry: int | None) -> None:
        super().__init__(**geometry)
        self.mlp = nn.Sequential(
            nn.Linear(self.in_dim, self.out_dim), nn.GELU(), nn.Linear(self.out_dim, self.out_dim)
        )
        # Depthwise (groups = channels) so the PEG adds only 9*H + H parameters at any width.
        self.peg = nn.Conv2d(self.out_dim, self.out_dim, kernel_size=3, padding=1, groups=self.out_dim)
        # PyTorch's default Linear / Conv2d inits (Projector.reset_parameters), as MobileVLM-v2.

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        s = self.scale_factor
        pooled = F.avg_pool2d(self.to_map(self.mlp(features)), kernel_size=s, stride=s)  # (B, H, g, g)
        return self.from_map(pooled + self.peg(pooled))  # PEG residual
