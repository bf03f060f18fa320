"""Seeded Gaussian random projections (FLoRA, Hao et al., 2024, arXiv:2402.03293). Pure tensor math; imports only
torch.

A projection is a `dim×r` matrix P with i.i.d. N(0, 1/r) entries, so E[P Pᵀ] = I_dim and compressing then
decompressing a gradient is unbiased. In the paper's notation the left projection is A = Pᵀ (r×m) and the right one
is B = P (n×r). The conventions are those of [`hf_galore.projection.subspace`], so `project` / `project_back` apply:

* left side (m < n): compressed gradient Pᵀ G (r×n), decompression P C;
* right side (m ≥ n): compressed gradient G P (m×r), decompression C Pᵀ.

A projection is never stored: it is regenerated from an int seed whenever it is needed. The draw always runs on a
CPU generator (CUDA generators produce other numbers for the same seed), so a seed names the same matrix on every
device, every data-parallel rank and after a resume; the matrix is then moved to the parameter's device.
"""

from __future__ import annotations

import torch

from .subspace import Side, project, project_back


def gaussian_projection(
    seed: int,
    dim: int,
    rank: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The `dim×rank` matrix with i.i.d. N(0, 1/rank) entries named by `seed`.

    Args:
        seed (`int`): Any integer in [0, 2⁶³); the same seed gives the same matrix on every device.
        dim (`int`): The projected dimension (m for the left side, n for the right side).
        rank (`int`): The compressed dimension r.
        device (`torch.device`, *optional*): Where the result goes (generated on CPU first). Defaults to CPU.
        dtype (`torch.dtype`, defaults to `torch.float32`): Dtype of the result (always drawn in fp32).

    Returns:
        `torch.Tensor` of shape `(dim, rank)` with E[P Pᵀ] = I.
    """
    if rank < 1 or dim < 1:
        raise ValueError(f"A projection needs dim ≥ 1 and rank ≥ 1, got dim={dim}, rank={rank}.")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    matrix = torch.randn(dim, rank, generator=generator, dtype=torch.float32)
    matrix.mul_(rank**-0.5)
    return matrix.to(device=device, dtype=dtype)


def projected_dim(shape: tuple[int, int] | torch.Size, side: Side) -> int:
    """The dimension of an m×n weight that a projection on `side` compresses (m for LEFT, n for RIGHT)."""
    if side == Side.LEFT:
        return int(shape[0])
    if side == Side.RIGHT:
        return int(shape[1])
    raise ValueError(f"Random projections are one-sided (LEFT or RIGHT), got {side!r}.")


def compress(grad: torch.Tensor, side: Side, projection: torch.Tensor) -> torch.Tensor:
    """Pᵀ G (LEFT, r×n) or G P (RIGHT, m×r)."""
    if side == Side.LEFT:
        return project(grad, side, projection, None)
    return project(grad, side, None, projection)


def decompress(low: torch.Tensor, side: Side, projection: torch.Tensor) -> torch.Tensor:
    """P C (LEFT) or C Pᵀ (RIGHT): an unbiased estimate of the gradient that was compressed into `low`."""
    if side == Side.LEFT:
        return project_back(low, side, projection, None)
    return project_back(low, side, None, projection)


def transfer_scale(dim: int, rank: int) -> float:
    """√(r / (d + r + 1)): the factor that keeps a transferred statistic's expected squared norm unchanged.

    For C = Pᵀ X with P a d×r Gaussian projection (N(0, 1/r) entries) independent of X, and a fresh P',
    E‖P'ᵀ P C‖² = E‖P Pᵀ X‖² = (d + r + 1)/r · ‖X‖² = (d + r + 1)/r · E‖C‖², because E[(P Pᵀ)²] = (d + r + 1)/r · I.
    The derivation is in docs/methods/flora.md ("Momentum transfer").
    """
    return (rank / (dim + rank + 1)) ** 0.5


def transfer(
    low: torch.Tensor, side: Side, old_projection: torch.Tensor, new_projection: torch.Tensor
) -> torch.Tensor:
    """Re-express a compressed statistic in a new projection: s · down_new(up_old(C)), s = [`transfer_scale`].

    down_new(up_old(·)) alone (the paper's transfer) multiplies the expected squared norm by (d + r + 1)/r at every
    resampling, so a momentum that survives a few resamplings grows geometrically; s keeps it in expectation and
    leaves the direction unchanged. Computed through the r×r matrix P_newᵀ P_old (LEFT: (P_newᵀ P_old) C; RIGHT:
    C (P_oldᵀ P_new)) instead of the m×n decompressed intermediate; mathematically identical.
    """
    dim, rank = old_projection.shape
    scale = transfer_scale(dim, rank)
    if side == Side.LEFT:
        return (new_projection.T @ old_projection).mul_(scale) @ low
    if side == Side.RIGHT:
        return low @ (old_projection.T @ new_projection).mul_(scale)
    raise ValueError(f"Random projections are one-sided (LEFT or RIGHT), got {side!r}.")
