"""TokenPacker: the coarse-to-fine projector (arXiv 2407.02392), faithful to the reference.

Each of the ``(grid/s)**2`` point queries is a bilinear downsample of the query-layer
features; it attends only to the ``s x s`` multi-level patch tokens of its own region
("region-to-point injection"), and the attention output replaces the query (no residual)
before the output MLP. Parameter names match the reference checkpoints exactly
(``q_proj_1``, ``k_proj_1.0``, ``clip_attn.in_proj_weight``, ``mlp.2`` ...), so a reference
``mm_projector`` state dict loads strictly.

Unlike the reference, every width, grid, scale and number of feature levels is a parameter,
and the region attention runs over all regions of all images at once, with the key and value
projections moved onto the one query of each region (see ``RegionAttention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector, init_linear_trunc_normal


class RegionAttention(nn.Module):
    """Multi-head attention of one query over the keys of its own region, for many regions.

    Same parameters (and so the same state-dict keys) as ``nn.MultiheadAttention``, and the
    same function, computed without projecting the keys and values. With one query per region,
    the key projection can move onto the query: ``q . (W_k x + b_k) = (W_k^T q) . x + q . b_k``,
    and since a head's attention weights sum to one, the value projection can move after the
    weighting: ``sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v``. That projects one
    vector per region and head instead of ``s * s`` keys and ``s * s`` values, so the key and
    value in-projections cost ``s * s`` times fewer FLOPs (4x at s = 2, 9x at s = 3).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"region attention width {dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's own init (the reference's trunc-normal init skips it).
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.trunc_normal_(self.out_proj.weight, std=0.02)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query`` (R, dim); ``key``/``value`` (R, L, dim) for R regions of L tokens -> (R, dim)."""
        regions = key.shape[0]
        heads, head_dim = self.num_heads, self.dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(regions, heads, head_dim) * head_dim**-0.5
        # (heads, R, head_dim) @ (heads, head_dim, dim): each head's query in key-input space.
        q_in = torch.bmm(q.transpose(0, 1), w_k.view(heads, head_dim, self.dim)).transpose(0, 1)
        # q . b_k is the same for every key of a region, so softmax ignores it; it is kept so the
        # function (and b_k's gradient, zero up to rounding) is exactly the reference's.
        scores = torch.bmm(q_in, key.transpose(1, 2)) + (q * b_k.view(heads, head_dim)).sum(-1, keepdim=True)
        weights = scores.float().softmax(-1).to(value.dtype)  # (R, heads, L)
        mixed = torch.bmm(weights, value)  # (R, heads, dim): each head's weighted mean of the inputs
        # (heads, R, dim) @ (heads, dim, head_dim): the value projection, once per region and head.
        out = torch.bmm(mixed.transpose(0, 1), w_v.view(heads, head_dim, self.dim).transpose(1, 2))
        return self.out_proj(out.transpose(0, 1).reshape(regions, self.dim) + b_v)


@PROJECTORS.register("tokenpacker")
class TokenPacker(Projector):
    """Packs a ``grid x grid`` patch map into ``(grid/s)**2`` tokens of width ``out_dim``.

    Args:
        in_dim: vision width C (query-layer features).
        out_dim: LLM hidden size H.
        grid_size: patches per side of the input map (24 for CLIP-L/336).
        multi_level_dim: width of the concatenated multi-level features (levels x C); equal
            to ``in_dim`` for the single-level ablation.
        scale_factor: s; 2/3/4 on a 24x24 grid give 144/64/36 tokens.
        num_heads: heads of the region attention (8 in the reference).
        layer_norm_eps: 1e-6 in the reference.
    """

    uses_multi_level = True
    default_scale_factor = 2

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        grid_size: int,
        multi_level_dim: int | None = None,
        scale_factor: int | None = None,
        num_heads: int = 8,
        layer_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__(
            in_dim=in_dim,
            out_dim=out_dim,
            grid_size=grid_size,
            multi_level_dim=multi_level_dim,
            scale_factor=scale_factor,
        )
        dim, kv_in = self.in_dim, self.multi_level_dim
        self.q_proj_1 = nn.Linear(dim, dim, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(kv_in, dim), nn.GELU(), nn.Linear(dim, dim))
        self.v_proj_1 = nn.Sequential(nn.Linear(kv_in, dim), nn.GELU(), nn.Linear(dim, dim))
        self.ln_q_1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ln_k_1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.ln_v_1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.clip_attn = RegionAttention(dim, num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(dim, self.out_dim), nn.GELU(), nn.Linear(self.out_dim, self.out_dim)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_trunc_normal(self)
        self.clip_attn.reset_parameters()

    def point_queries(self, features: torch.Tensor) -> torch.Tensor:
        """Bilinear downsample of the (B, G*G, C) map to (B, g*g, C), in fp32 as the reference."""
        out_side = self.grid_size // self.scale_factor
        grid = self.to_map(features).float()
        pooled = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=False)
        return self.from_map(pooled.to(features.dtype))

    def group_regions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G*G, C) row-major tokens -> (B*g*g, s*s, C): the tokens of each query's region."""
        return self.regions(tokens).flatten(0, 1)

    def forward(self, features: torch.Tensor, multi_level: torch.Tensor | None = None) -> torch.Tensor:
        if multi_level is None:
            if self.multi_level_dim != self.in_dim:
                raise ValueError(
                    f"TokenPacker was built for multi-level features of width {self.multi_level_dim}; "
                    "pass multi_level=... (or build it with multi_level_dim == in_dim for single-level keys)"
                )
            multi_level = features
        self.check_input(features, multi_level)
        batch = features.shape[0]
        keys = self.group_regions(self.ln_k_1(self.k_proj_1(multi_level)))
        values = self.group_regions(self.ln_v_1(self.v_proj_1(multi_level)))
        queries = self.ln_q_1(self.q_proj_1(self.point_queries(features)))
        packed = self.clip_attn(queries.reshape(-1, self.in_dim), keys, values)
        return self.mlp(packed.view(batch, -1, self.in_dim))


@PROJECTORS.register("tokenpacker_single")
class SingleLevelTokenPacker(TokenPacker):
    """The paper's ablation: TokenPacker with keys and values from the query layer only.

    No multi-level features are computed; the region attention reads the same features the
    point queries come from.
    """

    uses_multi_level = False

    def __init__(self, **kwargs) -> None:
        kwargs["multi_level_dim"] = kwargs.get("in_dim")
        super().__init__(**kwargs)
