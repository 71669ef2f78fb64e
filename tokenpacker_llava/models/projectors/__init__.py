"""Visual projectors, registered by exact name, and ``build_projector``.

Adding a projector means adding one module here that subclasses ``Projector`` and
registers itself with ``@PROJECTORS.register("name")``, then importing it below.
"""

from __future__ import annotations

from typing import Any

from tokenpacker_llava.models.projectors import (  # noqa: F401  (registers projectors)
    avgpool,
    c_abstractor,
    ldpv2,
    mlp,
    pixel_shuffle,
    resampler,
    tokenpacker,
)
from tokenpacker_llava.models.projectors.base import PROJECTORS, Projector, TokenPreservingProjector
from tokenpacker_llava.models.projectors.mlp import IdentityProjector, LinearProjector, MLP2xGELUProjector
from tokenpacker_llava.models.projectors.tokenpacker import RegionAttention, TokenPacker


def build_projector(
    name: str,
    *,
    in_dim: int,
    out_dim: int,
    grid_size: int,
    multi_level_dim: int | None = None,
    scale_factor: int | None = None,
    **options: Any,
) -> Projector:
    """Build the projector registered as ``name``.

    ``projector(features, multi_level=None)`` then maps ``(batch, grid_size**2, in_dim)`` to
    ``(batch, num_tokens, out_dim)``; ``options`` are projector-specific (e.g. ``num_heads``).
    """
    cls = PROJECTORS.get(name)
    return cls(
        in_dim=in_dim,
        out_dim=out_dim,
        grid_size=grid_size,
        multi_level_dim=multi_level_dim,
        scale_factor=scale_factor,
        **options,
    )


__all__ = [
    "PROJECTORS",
    "IdentityProjector",
    "LinearProjector",
    "MLP2xGELUProjector",
    "Projector",
    "RegionAttention",
    "TokenPacker",
    "TokenPreservingProjector",
    "build_projector",
]
