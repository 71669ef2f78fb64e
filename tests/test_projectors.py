"""Projectors: registry, shapes and token counts, the reference TokenPacker layout, and
the vectorized region attention against a straightforward per-region loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenpacker_llava.models.projectors import PROJECTORS, TokenPacker, build_projector
from tokenpacker_llava.models.projectors.base import Projector
from tokenpacker_llava.registry import Registry, RegistryError

# The reference table of REFERENCE.md section 1, for CLIP-L/336 and H = 4096.
REFERENCE_SHAPES_7B = {
    "q_proj_1.weight": (1024, 1024),
    "k_proj_1.0.weight": (1024, 4096),
    "k_proj_1.0.bias": (1024,),
    "k_proj_1.2.weight": (1024, 1024),
    "k_proj_1.2.bias": (1024,),
    "v_proj_1.0.weight": (1024, 4096),
    "v_proj_1.0.bias": (1024,),
    "v_proj_1.2.weight": (1024, 1024),
    "v_proj_1.2.bias": (1024,),
    "ln_q_1.weight": (1024,),
    "ln_q_1.bias": (1024,),
    "ln_k_1.weight": (1024,),
    "ln_k_1.bias": (1024,),
    "ln_v_1.weight": (1024,),
    "ln_v_1.bias": (1024,),
    "clip_attn.in_proj_weight": (3072, 1024),
    "clip_attn.in_proj_bias": (3072,),
    "clip_attn.out_proj.weight": (1024, 1024),
    "clip_attn.out_proj.bias": (1024,),
    "mlp.0.weight": (4096, 1024),
    "mlp.0.bias": (4096,),
    "mlp.2.weight": (4096, 4096),
    "mlp.2.bias": (4096,),
}


class LoopTokenPacker(nn.Module):
    """A straightforward TokenPacker written from the paper: one region at a time.

    Same parameter names as the reference (``nn.MultiheadAttention`` as ``clip_attn``), so
    the vectorized module's state dict loads into it strictly.
    """

    def __init__(self, dim: int, kv_dim: int, out_dim: int, grid: int, scale: int, heads: int = 8) -> None:
        super().__init__()
        self.grid, self.scale = grid, scale
        self.q_proj_1 = nn.Linear(dim, dim, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(kv_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.v_proj_1 = nn.Sequential(nn.Linear(kv_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.ln_q_1 = nn.LayerNorm(dim, eps=1e-6)
        self.ln_k_1 = nn.LayerNorm(dim, eps=1e-6)
        self.ln_v_1 = nn.LayerNorm(dim, eps=1e-6)
        self.clip_attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor, x_multi: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        side, s = self.grid, self.scale
        g = side // s
        key = self.ln_k_1(self.k_proj_1(x_multi)).view(batch, side, side, dim)
        value = self.ln_v_1(self.v_proj_1(x_multi)).view(batch, side, side, dim)
        q = F.interpolate(
            x.view(batch, side, side, dim).permute(0, 3, 1, 2).float(),
            size=(g, g),
            mode="bilinear",
            align_corners=False,
        )
        q = self.ln_q_1(self.q_proj_1(q.permute(0, 2, 3, 1).to(x.dtype)))  # (B, g, g, C)
        out = torch.empty(batch, g, g, dim)
        for b in range(batch):
            for i in range(g):
                for j in range(g):
                    k = key[b, i * s : (i + 1) * s, j * s : (j + 1) * s].reshape(s * s, 1, dim)
                    v = value[b, i * s : (i + 1) * s, j * s : (j + 1) * s].reshape(s * s, 1, dim)
                    out[b, i, j] = self.clip_attn(q[b, i, j].view(1, 1, dim), k, v)[0].view(dim)
        return self.mlp(out.view(batch, g * g, dim))


def test_registry_rejects_duplicates_and_names_unknowns() -> None:
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(RegistryError, match="already registered"):
        registry.add("a", 2)
    with pytest.raises(RegistryError, match="unknown thing 'ab'; available: a"):
        registry.get("ab")  # exact names only, no substring matching
    with pytest.raises(RegistryError, match="already registered"):
        PROJECTORS.register("tokenpacker")(TokenPacker)
    assert {"tokenpacker", "mlp2x_gelu", "linear", "identity"} <= set(PROJECTORS.names())


@pytest.mark.parametrize(("scale", "tokens"), [(1, 576), (2, 144), (3, 64), (4, 36), (6, 16), (8, 9)])
def test_tokenpacker_shapes_for_every_scale(scale: int, tokens: int) -> None:
    projector = build_projector(
        "tokenpacker", in_dim=32, multi_level_dim=96, out_dim=48, grid_size=24, scale_factor=scale
    )
    out = projector(torch.randn(2, 576, 32), multi_level=torch.randn(2, 576, 96))
    assert out.shape == (2, tokens, 48)
    assert projector.num_tokens == tokens == TokenPacker.output_tokens(24, scale)


@pytest.mark.parametrize(("grid", "scale"), [(12, 2), (12, 3), (16, 4), (27, 3), (14, 7)])
def test_tokenpacker_other_grids(grid: int, scale: int) -> None:
    projector = build_projector(
        "tokenpacker", in_dim=16, multi_level_dim=16, out_dim=24, grid_size=grid, scale_factor=scale
    )
    out = projector(torch.randn(3, grid * grid, 16))  # single-level keys: multi_level defaults to features
    assert out.shape == (3, (grid // scale) ** 2, 24)


@pytest.mark.parametrize("name", ["mlp2x_gelu", "linear"])
def test_token_preserving_projectors(name: str) -> None:
    projector = build_projector(name, in_dim=32, out_dim=48, grid_size=24)
    assert projector(torch.randn(2, 576, 32)).shape == (2, 576, 48)
    assert projector.num_tokens == 576
    with pytest.raises(ValueError, match="keeps every patch token"):
        build_projector(name, in_dim=32, out_dim=48, grid_size=24, scale_factor=2)


def test_identity_projector() -> None:
    features = torch.randn(2, 144, 32)
    assert build_projector("identity", in_dim=32, out_dim=32, grid_size=12)(features) is features
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        build_projector("identity", in_dim=32, out_dim=48, grid_size=12)


@pytest.mark.parametrize(("grid", "scale"), [(24, 5), (24, 7), (12, 5)])
def test_grid_not_divisible_by_scale_is_a_clear_error(grid: int, scale: int) -> None:
    with pytest.raises(ValueError, match=f"not divisible by {scale}.*divide this grid"):
        build_projector("tokenpacker", in_dim=32, out_dim=32, grid_size=grid, scale_factor=scale)


def test_wrong_input_shapes_are_clear_errors() -> None:
    projector = build_projector("tokenpacker", in_dim=32, multi_level_dim=64, out_dim=32, grid_size=12)
    with pytest.raises(ValueError, match=r"\(batch, 144, 32\)"):
        projector(torch.randn(1, 145, 32), torch.randn(1, 145, 64))
    with pytest.raises(ValueError, match="multi_level"):
        projector(torch.randn(1, 144, 32))
    with pytest.raises(ValueError, match=r"multi_level of shape \(batch, 144, 64\)"):
        projector(torch.randn(1, 144, 32), torch.randn(1, 144, 32))


@pytest.mark.parametrize(("out_dim", "params"), [(4096, 36_722_688), (5120, 47_210_496)])
def test_reference_state_dict_and_parameter_count(out_dim: int, params: int) -> None:
    with torch.device("meta"):  # real sizes, no memory
        projector = build_projector(
            "tokenpacker", in_dim=1024, multi_level_dim=4096, out_dim=out_dim, grid_size=24, scale_factor=2
        )
    expected = {
        k: tuple(out_dim if d == 4096 and k.startswith("mlp") else d for d in v)
        for k, v in REFERENCE_SHAPES_7B.items()
    }
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == expected
    assert list(projector.state_dict()) == list(REFERENCE_SHAPES_7B)
    assert sum(p.numel() for p in projector.parameters()) == params


@pytest.mark.parametrize(
    ("dim", "kv_dim", "out_dim", "grid", "scale", "heads"),
    [(64, 256, 96, 12, 2, 8), (64, 128, 80, 12, 3, 4), (32, 128, 48, 24, 4, 8), (48, 48, 64, 6, 2, 2)],
)
def test_vectorized_tokenpacker_equals_per_region_loop(dim, kv_dim, out_dim, grid, scale, heads) -> None:
    torch.manual_seed(0)
    projector = build_projector(
        "tokenpacker",
        in_dim=dim,
        multi_level_dim=kv_dim,
        out_dim=out_dim,
        grid_size=grid,
        scale_factor=scale,
        num_heads=heads,
    )
    with torch.no_grad():  # random, non-trivial weights everywhere (LayerNorms and biases too)
        for param in projector.parameters():
            param.normal_(0, 0.2)
    loop = LoopTokenPacker(dim, kv_dim, out_dim, grid, scale, heads)
    loop.load_state_dict(projector.state_dict(), strict=True)  # same keys as the reference module
    x, x_multi = torch.randn(3, grid * grid, dim), torch.randn(3, grid * grid, kv_dim)
    with torch.no_grad():
        expected = loop(x, x_multi)
        actual = projector(x, x_multi)
    assert actual.shape == expected.shape == (3, (grid // scale) ** 2, out_dim)
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["tokenpacker", "mlp2x_gelu", "linear"])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(name, in_dim=32, multi_level_dim=64, out_dim=48, grid_size=12)
    features = torch.randn(2, 144, 32, requires_grad=True)
    projector(features, multi_level=torch.randn(2, 144, 64)).square().mean().backward()
    for param_name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_tokenpacker_init_matches_reference() -> None:
    torch.manual_seed(0)
    projector = build_projector("tokenpacker", in_dim=256, multi_level_dim=512, out_dim=256, grid_size=4)
    weight = projector.mlp[2].weight
    assert weight.abs().max() <= 2.0 and abs(weight.std().item() - 0.02) < 0.002  # trunc normal, std 0.02
    assert projector.mlp[2].bias.abs().sum() == 0 and projector.q_proj_1.bias is None
    assert torch.equal(projector.ln_q_1.weight, torch.ones(256))
    assert projector.clip_attn.in_proj_bias.abs().sum() == 0


def test_bf16_forward_keeps_dtype() -> None:
    projector = build_projector("tokenpacker", in_dim=32, multi_level_dim=64, out_dim=48, grid_size=12).to(
        torch.bfloat16
    )
    out = projector(
        torch.randn(2, 144, 32, dtype=torch.bfloat16), torch.randn(2, 144, 64, dtype=torch.bfloat16)
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_every_registered_projector_is_a_projector() -> None:
    for name in PROJECTORS.names():
        assert issubclass(PROJECTORS.get(name), Projector)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tokenpacker_in_bf16_on_cuda_follows_the_fp32_loop() -> None:
    # bf16 numerics of the absorbed region attention (fp32 softmax) against the reference's
    # per-region formulation in fp32, at CLIP-L widths.
    torch.manual_seed(0)
    dim, kv_dim, out_dim, grid = 1024, 4096, 1024, 24
    projector = build_projector(
        "tokenpacker", in_dim=dim, multi_level_dim=kv_dim, out_dim=out_dim, grid_size=grid, scale_factor=2
    )
    loop = LoopTokenPacker(dim, kv_dim, out_dim, grid, 2, 8)
    loop.load_state_dict(projector.state_dict(), strict=True)
    x, x_multi = torch.randn(2, grid * grid, dim), torch.randn(2, grid * grid, kv_dim)
    with torch.no_grad():
        expected = loop(x, x_multi)
        actual = projector.cuda().bfloat16()(x.cuda().bfloat16(), x_multi.cuda().bfloat16()).float().cpu()
    scale = expected.abs().mean().item()
    assert (actual - expected).abs().mean().item() < 0.02 * scale
