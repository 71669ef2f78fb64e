"""``resampler``: a Perceiver-style resampler (learned queries cross-attending to the patches).

The paper's "Resampler" baseline, as in Flamingo / Qwen-VL: ``(grid/s)**2`` learned queries
attend to all patch tokens (keys get a learned position embedding, since attention alone
does not know where a patch is), then a LayerNorm and a linear output. Unlike TokenPacker,
every query may attend anywhere, so nothing ties a token to a region of the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector


@PROJECTORS.register("resampler")
class PerceiverResampler(Projector):
    default_scale_factor = 2

    def __init__(self, *, num_heads: int = 8, **geometry: int | None) -> None:
        super().__init__(**geometry)
        width = self.out_dim
        if width % num_heads:
            raise ValueError(f"resampler: out_dim {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.empty(self.num_tokens, width))
        self.key_position = nn.Parameter(torch.empty(self.grid_size**2, width))
        self.kv_proj = nn.Linear(self.in_dim, width, bias=False)
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.trunc_normal_(self.key_position, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(features, None)
        batch = features.shape[0]
        heads, head_dim = self.num_heads, self.out_dim // self.num_heads
        kv = self.ln_kv(self.kv_proj(features))
        queries = self.ln_q(self.queries).unsqueeze(0).expand(batch, -1, -1)
        q = self.q_proj(queries).view(batch, -1, heads, head_dim).transpose(1, 2)
        k = self.k_proj(kv + self.key_position).view(batch, -1, heads, head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, self.out_dim)
        return self.proj(self.ln_post(self.out_proj(out)))
