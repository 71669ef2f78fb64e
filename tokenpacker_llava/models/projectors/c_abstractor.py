"""``c_abstractor``: Honeybee's convolutional abstractor (ResNet blocks + adaptive pooling).

The paper's "C-Abstractor" baseline: the patch map goes through ``depth`` residual conv
blocks, is pooled to ``(grid/s) x (grid/s)``, goes through ``depth`` more blocks, then a
readout MLP maps to the LLM width. Honeybee uses timm RegNet stages with squeeze-excitation;
these blocks keep its structure (3x3 convs, channel LayerNorm, SiLU, residual) in plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector


class ResidualConvBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(1, dim)  # LayerNorm over channels and space, as LayerNorm2d
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(1, dim)
        self.squeeze = nn.Linear(dim, max(1, dim // 4))
        self.excite = nn.Linear(max(1, dim // 4), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        gate = torch.sigmoid(self.excite(F.silu(self.squeeze(y.mean(dim=(2, 3))))))
        return F.silu(x + y * gate[:, :, None, None])


@PROJECTORS.register("c_abstractor")
class CAbstractor(Projector):
    default_scale_factor = 2

    def __init__(self, *, depth: int = 3, **geometry: int | None) -> None:
        super().__init__(**geometry)
        dim = self.in_dim
        self.before = nn.Sequential(*[ResidualConvBlock(dim) for _ in range(depth)])
        self.after = nn.Sequential(*[ResidualConvBlock(dim) for _ in range(depth)])
        self.readout = nn.Sequential(
            nn.Linear(dim, self.out_dim), nn.SiLU(), nn.Linear(self.out_dim, self.out_dim)
        )

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        out_side = self.grid_size // self.scale_factor
        x = self.after(F.adaptive_avg_pool2d(self.before(self.to_map(features)), out_side))
        return self.readout(self.from_map(x))
