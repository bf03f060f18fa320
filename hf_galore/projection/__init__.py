"""Projection math (pure torch): subspaces of gradients and the projections onto them."""

from .subspace import (
    Side,
    add_projected_back_,
    canonicalize_signs,
    choose_side,
    compute_bases,
    left_basis,
    low_rank_shape,
    project,
    project_back,
)

__all__ = [
    "Side",
    "add_projected_back_",
    "canonicalize_signs",
    "choose_side",
    "compute_bases",
    "left_basis",
    "low_rank_shape",
    "project",
    "project_back",
]
