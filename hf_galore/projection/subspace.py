"""Top-r subspace of a gradient and the GaLore projection on it. Pure tensor math; imports only torch.

Conventions (G is the m×n gradient of an m×n weight, r the rank):

* left side: basis P (m×r), projected gradient Pᵀ G (r×n), back-projection P N.
* right side: basis Q (n×r), projected gradient G Q (m×r), back-projection N Qᵀ.
* both sides (`full`): Pᵀ G Q (r×r), back-projection P N Qᵀ.

The side is decided once from the *weight* shape and stored; it is never re-derived from a projected shape
(re-deriving it is how other implementations pick the wrong side when r ≥ min(m, n)).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

import torch


class Side(IntEnum):
    """Which side(s) of a weight are projected; stored in optimizer state as a plain int."""

    NONE = 0
    LEFT = 1
    RIGHT = 2
    FULL = 3  # proj_type="full": both sides
    BOTH = 3  # deprecated alias of FULL (same value, so saved states read the same)


def choose_side(shape: tuple[int, ...] | torch.Size, proj_type: str, rank: int) -> Side:
    """Side to project for a weight of `shape` (m, n), or `Side.NONE` when rank ≥ min(m, n).

    `std` keeps the smaller dimension's basis (left when m < n, right otherwise, square included), `reverse_std`
    the opposite, `left`/`right` force a side and `full` projects both.
    """
    if len(shape) != 2:
        raise ValueError(f"GaLore projects 2-D weights only, got shape {tuple(shape)}.")
    m, n = shape
    if rank >= min(m, n):
        return Side.NONE
    if proj_type == "std":
        return Side.LEFT if m < n else Side.RIGHT
    if proj_type == "reverse_std":
        return Side.RIGHT if m < n else Side.LEFT
    if proj_type == "left":
        return Side.LEFT
    if proj_type == "right":
        return Side.RIGHT
    if proj_type == "full":
        return Side.FULL
    raise ValueError(f"Unknown proj_type {proj_type!r}; choose one of std, reverse_std, left, right, full.")


def row_sharded_side(shape: tuple[int, ...] | torch.Size, proj_type: str, rank: int) -> Side:
    """Side to project for a weight of global `shape` (m, n) whose rows are sharded across processes (FSDP2's
    `Shard(0)`), or `Side.NONE` when rank ≥ min(m, n).

    Only the right side keeps the step free of communication: with Q (n×r) replicated, a rank's row block G_k
    projects locally (G_k Q, m_k×r), its moments shard by rows like the weight, and the back-projection N_k Qᵀ is
    local. A left basis P (m×r) would need Pᵀ G = Σ_k P_kᵀ G_k, an all-reduce of r×n every step. So `std` means
    `right` here, for wide weights too (m < n): their moments are m×r instead of r×n (more state, still sharded,
    never communicated), the price of a step with no collective. `right` and `reverse_std` on a tall or square
    weight are the right side anyway.

    Raises:
        ValueError: for `left`, `full`, and `reverse_std` on a weight it would project on the left (m ≥ n), naming
            the supported values.
    """
    if len(shape) != 2:
        raise ValueError(f"GaLore projects 2-D weights only, got shape {tuple(shape)}.")
    m, n = shape
    if rank >= min(m, n):
        return Side.NONE
    if proj_type in ("std", "right") or (proj_type == "reverse_std" and m < n):
        return Side.RIGHT
    raise ValueError(
        f"proj_type={proj_type!r} projects the weight of shape {tuple(shape)} on the left (or both sides), which a "
        "row-sharded (FSDP2) weight cannot do without an r×n all-reduce every step; use proj_type='std' or 'right' "
        "(under row sharding both project on the right side: basis Q n×r replicated, moments m×r sharded by rows)."
    )


def canonicalize_signs(basis: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (in place; returns `basis`).

    Singular vectors are defined up to sign; fixing it makes the basis a deterministic function of the gradient,
    so moments carried across a refresh keep their orientation and every rank computes the same basis.
    """
    idx = basis.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(basis, 0, idx))
    signs[signs == 0] = 1
    return basis.mul_(signs)


def align_signs(basis: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Flip each column of `basis` whose dot product with the same column of `previous` is negative (in place;
    returns `basis`).

    After a refresh the carried moments are read in the new basis; where a new vector nearly equals an old one up
    to sign, aligning keeps the moment's coordinate on it meaning the same direction.
    """
    dots = (basis.float() * previous.to(device=basis.device, dtype=torch.float32)).sum(dim=0)
    signs = torch.where(dots < 0, -1.0, 1.0).to(basis.dtype)
    return basis.mul_(signs)


def exact_left_basis(matrix: torch.Tensor, rank: int, canonical: bool = True) -> torch.Tensor:
    """Top-`rank` left singular vectors of `matrix` (fp32) by a full SVD; `canonical=False` keeps the SVD's signs."""
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    basis = u[:, :rank].contiguous()
    return canonicalize_signs(basis) if canonical else basis


def randomized_left_basis(
    matrix: torch.Tensor,
    rank: int,
    power_iters: int,
    oversample: int,
    generator: torch.Generator,
    canonical: bool = True,
) -> torch.Tensor:
    """Top-`rank` left singular vectors of `matrix` (fp32) by a randomized range finder (Halko et al., 2011).

    A Gaussian sketch Y = A Ω (Ω: n×(r+p)) spans A's dominant range; `power_iters` rounds of Y ← A (Aᵀ Y) with QR
    re-orthonormalisation sharpen it; the top-r left singular vectors U_small of the small (r+p)×n matrix B = Qᵀ A
    then give the basis Q U_small.

    U_small is taken from an eigendecomposition of the (r+p)×(r+p) Gram matrix B Bᵀ = U_small Σ² U_smallᵀ rather
    than from an SVD of the wide B: the same vectors for a fraction of the cost (on CPU, 32 ms instead of 191 ms
    for a 544×11008 B; `benchmarks/results/projection_cost_cpu.md`). Squaring the singular values only blurs directions whose
    σ² is below fp32 resolution relative to σ₁², where the basis is arbitrary anyway; the captured energy is
    unchanged (tested against the exact SVD).
    """
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, device=generator.device, dtype=matrix.dtype)
    omega = omega.to(matrix.device)
    q, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ z)
    small = q.T @ matrix
    # The Gram matrix squares the singular values: normalise first so that it neither overflows (σ₁ > ~1e19) nor
    # underflows in fp32; the eigenvectors do not depend on the scale.
    small = small / small.abs().amax().clamp_min(torch.finfo(small.dtype).tiny)
    _, eigenvectors = torch.linalg.eigh(small @ small.T)  # eigenvalues ascending: the top r are the last columns
    basis = (q @ eigenvectors[:, -rank:].flip(-1)).contiguous()
    return canonicalize_signs(basis) if canonical else basis


def sharded_right_basis(
    rows: torch.Tensor,
    row_offset: int,
    total_rows: int,
    rank: int,
    power_iters: int,
    oversample: int,
    generator: torch.Generator,
    all_reduce_sum: Callable[[torch.Tensor], None],
    all_reduce_max: Callable[[torch.Tensor], None],
    canonical: bool = True,
) -> torch.Tensor:
    """Top-`rank` right singular vectors (n×r, fp32) of an m×n matrix G whose rows are spread over processes: this
    process holds `rows` = G[row_offset : row_offset + m_k] (`total_rows` = m). Every process gets the same basis.

    The randomized range finder of [`randomized_left_basis`] applied to Gᵀ (what [`compute_bases`] does for the
    right side), with each product that needs all of G's rows summed over the processes by `all_reduce_sum` (in
    place, on a tensor every process holds):

    * sketch Y = Gᵀ Ω = Σ_k G_kᵀ Ω_k (n×w, w = min(r+p, m, n)); Ω (m×w) is drawn whole from `generator` on every
      process, each taking its own rows, so it is the one-process Ω;
    * each power iteration: Y ← Gᵀ (G Q) = Σ_k G_kᵀ (G_k Q) (n×w). One process orthonormalises G Q (m×w) first; the
      Q factor of Gᵀ Z R⁻¹ equals that of Gᵀ Z up to column signs (R is upper triangular), which the final
      eigendecomposition and sign convention absorb, so the m×w matrix never needs gathering;
    * the small Gram matrix B Bᵀ = Σ_k (G_k Q)ᵀ (G_k Q) (w×w), after scaling by the global max |G Q| (`all_reduce_max`
      of one number), as the one-process code scales B.

    Communication per call: (1 + power_iters) all-reduces of n×w, one of w×w and one of a scalar; nothing m×n.
    """
    local = rows.detach().to(torch.float32)
    n = local.shape[1]
    width = min(rank + oversample, total_rows, n)
    omega = torch.randn(total_rows, width, generator=generator, device=generator.device, dtype=torch.float32)
    omega = omega[row_offset : row_offset + local.shape[0]].to(local.device)
    sketch = local.T @ omega
    all_reduce_sum(sketch)
    q, _ = torch.linalg.qr(sketch)
    for _ in range(power_iters):
        sketch = local.T @ (local @ q)
        all_reduce_sum(sketch)
        q, _ = torch.linalg.qr(sketch)
    small = local @ q  # this process' rows of (Qᵀ Gᵀ)ᵀ, m_k×w
    peak = small.abs().amax() if small.numel() else small.new_zeros(())
    peak = peak.reshape(1).clone()
    all_reduce_max(peak)
    small = small / peak.clamp_min(torch.finfo(small.dtype).tiny)
    gram = small.T @ small
    all_reduce_sum(gram)
    _, eigenvectors = torch.linalg.eigh(gram)
    basis = (q @ eigenvectors[:, -rank:].flip(-1)).contiguous()
    return canonicalize_signs(basis) if canonical else basis


def left_basis(
    matrix: torch.Tensor,
    rank: int,
    method: str = "randomized",
    power_iters: int = 1,
    oversample: int = 32,
    generator: torch.Generator | None = None,
    canonical: bool = True,
) -> torch.Tensor:
    """Top-`rank` left singular vectors of `matrix`, computed in fp32 whatever its dtype, returned in fp32.

    `canonical=True` flips each vector so its largest-magnitude entry is positive ([`canonicalize_signs`]);
    `False` keeps the signs the decomposition returned.
    """
    work = matrix.detach().to(torch.float32)
    if method == "exact":
        return exact_left_basis(work, rank, canonical)
    if method == "randomized":
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        return randomized_left_basis(work, rank, power_iters, oversample, generator, canonical)
    raise ValueError(f"Unknown subspace method {method!r}; choose 'randomized' or 'exact'.")


def compute_bases(
    grad: torch.Tensor,
    side: Side,
    rank: int,
    method: str = "randomized",
    power_iters: int = 1,
    oversample: int = 32,
    generator: torch.Generator | None = None,
    canonical: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(P, Q)` for `side`: P (m×r) for LEFT/FULL, Q (n×r) for RIGHT/FULL, in the gradient's dtype.

    The decomposition itself always runs in fp32 (bf16/fp16 SVD is unsupported or inaccurate); the result is cast
    back so that the per-step projections run in the gradient's dtype. `exact` takes both sides from one SVD of G;
    `randomized` computes Q as the left basis of Gᵀ.

    Raises:
        torch.linalg.LinAlgError / RuntimeError: when the decomposition fails; callers keep the previous basis.
    """
    p = q = None
    if method == "exact":  # one SVD G = U S Vᵀ gives both sides, with the signs galore-torch sees (P = U, Q = V)
        u, _, vh = torch.linalg.svd(grad.detach().to(torch.float32), full_matrices=False)
        fix = canonicalize_signs if canonical else (lambda basis: basis)
        if side in (Side.LEFT, Side.FULL):
            p = fix(u[:, :rank].contiguous()).to(grad.dtype)
        if side in (Side.RIGHT, Side.FULL):
            q = fix(vh[:rank].T.contiguous()).to(grad.dtype)
        return p, q
    if side in (Side.LEFT, Side.FULL):
        p = left_basis(grad, rank, method, power_iters, oversample, generator, canonical).to(grad.dtype)
    if side in (Side.RIGHT, Side.FULL):
        q = left_basis(grad.T, rank, method, power_iters, oversample, generator, canonical).to(grad.dtype)
    return p, q


def project(grad: torch.Tensor, side: Side, p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor:
    """Low-rank gradient: Pᵀ G (LEFT), G Q (RIGHT) or Pᵀ G Q (FULL)."""
    if side == Side.LEFT:
        return p.T @ grad
    if side == Side.RIGHT:
        return grad @ q
    if side == Side.FULL:
        return p.T @ grad @ q
    raise ValueError(f"Cannot project with side {side!r}.")


def project_back(low_rank: torch.Tensor, side: Side, p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor:
    """Full-size update from a low-rank one: P N (LEFT), N Qᵀ (RIGHT) or P N Qᵀ (FULL)."""
    if side == Side.LEFT:
        return p @ low_rank
    if side == Side.RIGHT:
        return low_rank @ q.T
    if side == Side.FULL:
        return p @ low_rank @ q.T
    raise ValueError(f"Cannot project back with side {side!r}.")


def add_projected_back_(
    weight: torch.Tensor,
    low_rank: torch.Tensor,
    side: Side,
    p: torch.Tensor | None,
    q: torch.Tensor | None,
    alpha: float,
    beta: float = 1.0,
) -> None:
    """weight ← beta · weight + alpha · project_back(low_rank), one `addmm_` (no m×n temporary) for one-sided sides.

    `beta` folds a decoupled weight decay (beta = 1 − lr·wd) into the same pass over the weight. `beta=0` is not
    accepted: `addmm_` would then ignore the old weight (NaNs included) instead of multiplying it by zero.
    """
    if beta == 0:
        raise ValueError("add_projected_back_ needs beta != 0 (lr * weight_decay == 1 zeroes the weight).")
    low_rank = low_rank.to(weight.dtype)
    if side == Side.LEFT:
        weight.addmm_(p, low_rank, beta=beta, alpha=alpha)
    elif side == Side.RIGHT:
        weight.addmm_(low_rank, q.T, beta=beta, alpha=alpha)
    elif side == Side.FULL:
        weight.addmm_(p, low_rank @ q.T, beta=beta, alpha=alpha)
    else:
        raise ValueError(f"Cannot project back with side {side!r}.")


def low_rank_shape(shape: tuple[int, int] | torch.Size, side: Side, rank: int) -> tuple[int, int]:
    """Shape of the projected gradient of an m×n weight."""
    m, n = shape
    if side == Side.LEFT:
        return (rank, n)
    if side == Side.RIGHT:
        return (m, rank)
    if side == Side.FULL:
        return (rank, rank)
    return (m, n)


def change_basis(
    low_rank: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, squared: bool = False
) -> torch.Tensor:
    """`left @ low_rank @ right` (a missing factor is the identity): a projected tensor re-expressed in a new basis.

    With `squared=True` the factors' entries are squared first: how a second moment (a mean of squares) moves when
    its coordinates are uncorrelated. Computed in fp32, returned in fp32.
    """
    out = low_rank.float()
    if left is not None:
        out = (left * left if squared else left) @ out
    if right is not None:
        out = out @ (right * right if squared else right)
    return out
