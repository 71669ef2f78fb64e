"""Baseline projectors ``avgpool_mlp``, ``pixel_shuffle`` and ``ldpv2``: registry, shapes and
token counts for every scale that divides the grid, gradient flow, geometry errors, and the
documented pooling / packing order against straightforward per-region loops."""

from __future__ import annotations

import pytest
import torch

from tokenpacker_llava.models.projectors import PROJECTORS, build_projector
from tokenpacker_llava.models.projectors.avgpool import AvgPoolMLPProjector
from tokenpacker_llava.models.projectors.ldpv2 import LDPv2Projector
from tokenpacker_llava.models.projectors.pixel_shuffle import PixelShuffleProjector

BASELINES = {
    "avgpool_mlp": AvgPoolMLPProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "ldpv2": LDPv2Projector,
}
IN_DIM, OUT_DIM = 8, 16


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_registered_by_exact_name(name: str) -> None:
    assert PROJECTORS.get(name) is BASELINES[name]
    assert not BASELINES[name].uses_multi_level and BASELINES[name].default_scale_factor == 2
    projector = build_projector(name, in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=24)
    assert projector.scale_factor == 2 and projector.num_tokens == 144


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize(
    ("grid", "scale", "tokens"),
    [(24, 2, 144), (24, 3, 64), (24, 4, 36), (12, 2, 36), (12, 3, 16), (12, 4, 9)],
)
def test_shapes_and_token_counts(name: str, grid: int, scale: int, tokens: int) -> None:
    projector = build_projector(name, in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=grid, scale_factor=scale)
    assert projector.num_tokens == tokens == BASELINES[name].output_tokens(grid, scale)
    out = projector(torch.randn(2, grid * grid, IN_DIM))
    assert out.shape == (2, tokens, OUT_DIM) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("scale", [2, 3])
def test_gradients_reach_every_parameter(name: str, scale: int) -> None:
    torch.manual_seed(0)
    projector = build_projector(name, in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=12, scale_factor=scale)
    projector(torch.randn(2, 144, IN_DIM)).square().mean().backward()
    for param_name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_scale_that_does_not_divide_the_grid_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=r"24 is not divisible by 5.*\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        build_projector(name, in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=24, scale_factor=5)
    with pytest.raises(ValueError, match="not divisible"):
        BASELINES[name].output_tokens(24, 5)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_wrong_input_shape_is_rejected(name: str) -> None:
    projector = build_projector(name, in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=12)
    with pytest.raises(ValueError, match=r"\(batch, 144, 8\)"):
        projector(torch.randn(2, 143, IN_DIM))


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_reset_parameters_is_deterministic_under_a_seed(name: str) -> None:
    projector = build_projector(name, in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=12)
    torch.manual_seed(1)
    projector.reset_parameters()
    first = {k: v.clone() for k, v in projector.state_dict().items()}
    torch.manual_seed(1)
    projector.reset_parameters()
    for key, value in projector.state_dict().items():
        assert torch.equal(value, first[key]), key


def _region(features: torch.Tensor, grid: int, scale: int, row: int, col: int) -> torch.Tensor:
    """(B, s*s, C): the tokens of region (row, col), in row-major order, by explicit indexing."""
    index = [(row * scale + dy) * grid + col * scale + dx for dy in range(scale) for dx in range(scale)]
    return features[:, index]


def test_avgpool_means_each_region() -> None:
    grid, scale = 6, 3
    projector = AvgPoolMLPProjector(in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=grid, scale_factor=scale)
    features = torch.randn(2, grid * grid, IN_DIM)
    g = grid // scale
    expected = torch.stack(
        [_region(features, grid, scale, r, c).mean(1) for r in range(g) for c in range(g)], dim=1
    )
    torch.testing.assert_close(projector.pool(features), expected)
    torch.testing.assert_close(projector(features), projector.mlp(expected))


def test_pixel_shuffle_concatenates_region_tokens_in_documented_order() -> None:
    grid, scale = 6, 2
    projector = PixelShuffleProjector(in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=grid, scale_factor=scale)
    features = torch.randn(2, grid * grid, IN_DIM)
    g = grid // scale
    # channel (dy*s + dx)*C + c <- channel c of patch (row*s + dy, col*s + dx)
    expected = torch.stack(
        [_region(features, grid, scale, r, c).flatten(1) for r in range(g) for c in range(g)], dim=1
    )
    assert projector.norm.normalized_shape == (scale * scale * IN_DIM,)
    torch.testing.assert_close(projector.space_to_depth(features), expected)
    torch.testing.assert_close(projector(features), projector.mlp(projector.norm(expected)))


def test_ldpv2_is_mlp_then_pool_then_depthwise_peg_residual() -> None:
    grid, scale = 6, 2
    projector = LDPv2Projector(in_dim=IN_DIM, out_dim=OUT_DIM, grid_size=grid, scale_factor=scale)
    assert projector.peg.groups == OUT_DIM and projector.peg.weight.shape == (OUT_DIM, 1, 3, 3)
    features = torch.randn(2, grid * grid, IN_DIM)
    tokens = projector.mlp(features)
    g = grid // scale
    pooled = torch.stack([_region(tokens, grid, scale, r, c).mean(1) for r in range(g) for c in range(g)], 1)
    pooled_map = pooled.transpose(1, 2).reshape(2, OUT_DIM, g, g)
    # PEG by hand: zero-padded 3x3 depthwise correlation plus bias, added to its input.
    padded = torch.nn.functional.pad(pooled_map, (1, 1, 1, 1))
    peg = projector.peg.bias.view(1, -1, 1, 1).expand_as(pooled_map).clone()
    for dy in range(3):
        for dx in range(3):
            peg = peg + padded[:, :, dy : dy + g, dx : dx + g] * projector.peg.weight[:, 0, dy, dx].view(
                1, -1, 1, 1
            )
    expected = (pooled_map + peg).flatten(2).transpose(1, 2)
    torch.testing.assert_close(projector(features), expected)
