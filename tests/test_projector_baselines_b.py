"""Baseline projectors of the paper's comparison: resampler, C-Abstractor, single-level TokenPacker."""

from __future__ import annotations

import pytest
import torch
from conftest import multimodal_batch, tiny_model

from tokenpacker_llava.models.projectors import PROJECTORS, build_projector

NAMES = ("resampler", "c_abstractor", "tokenpacker_single")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("grid", "scale"), [(24, 2), (24, 3), (24, 4), (12, 2), (12, 3)])
def test_shapes_and_token_counts(name: str, grid: int, scale: int) -> None:
    projector = build_projector(name, in_dim=32, out_dim=48, grid_size=grid, scale_factor=scale)
    out = projector(torch.randn(2, grid * grid, 32))
    assert out.shape == (2, (grid // scale) ** 2, 48)
    assert projector.num_tokens == (grid // scale) ** 2 == PROJECTORS.get(name).output_tokens(grid, scale)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(name, in_dim=32, out_dim=48, grid_size=12, scale_factor=2)
    projector(torch.randn(2, 144, 32)).square().mean().backward()
    for param_name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_grid_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="not divisible by 5"):
        build_projector(name, in_dim=32, out_dim=48, grid_size=24, scale_factor=5)


def test_single_level_tokenpacker_reads_no_multi_level_features() -> None:
    projector = build_projector("tokenpacker_single", in_dim=32, out_dim=48, grid_size=12)
    assert not projector.uses_multi_level and projector.multi_level_dim == 32
    assert projector.k_proj_1[0].weight.shape == (32, 32)  # keys from the query layer's width


@pytest.mark.parametrize("name", NAMES)
def test_in_the_model(name: str) -> None:
    model = tiny_model(projector=name).train()
    assert model.config.resolved_multi_level_layers == []
    batch = multimodal_batch(model)
    ids = batch["input_ids"]
    labels = ids.masked_fill((batch["attention_mask"] == 0) | (ids == model.config.image_token_id), -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
