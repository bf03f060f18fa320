"""Projection math against the slow reference (`hf_galore.optim._reference`)."""

from __future__ import annotations

import pytest
import torch

from hf_galore.optim._reference import (
    reference_bases,
    reference_canonical_signs,
    reference_project,
    reference_project_back,
    reference_side,
)
from hf_galore.projection import (
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

SHAPES = {"tall": (23, 11), "wide": (11, 23), "square": (16, 16)}
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
SIDE_NAMES = {Side.NONE: "none", Side.LEFT: "left", Side.RIGHT: "right", Side.FULL: "both"}


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("rank", [3, 11, 40])
def test_side_matches_reference_table(proj_type, shape, rank):
    assert SIDE_NAMES[choose_side(shape, proj_type, rank)] == reference_side(shape, proj_type, rank)


def test_std_side_is_chosen_from_the_weight_shape():
    # The square case goes right, as in the GaLore reference implementation.
    assert choose_side((16, 16), "std", 4) == Side.RIGHT
    assert choose_side((8, 32), "std", 4) == Side.LEFT
    # rank >= min(m, n): no projection at all (RoBERTa's 768x2 classifier at rank 8).
    assert choose_side((2, 768), "std", 8) == Side.NONE
    with pytest.raises(ValueError, match="2-D"):
        choose_side((4,), "std", 1)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_exact_bases_projection_and_back_projection_match_reference(proj_type, shape):
    rank = 4
    grad = torch.randn(*shape)
    side = choose_side(shape, proj_type, rank)
    p, q = compute_bases(grad, side, rank, method="exact")
    ref_p, ref_q = reference_bases(grad, SIDE_NAMES[side], rank)
    for ours, ref in ((p, ref_p), (q, ref_q)):
        assert (ours is None) == (ref is None)
        if ours is not None:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    low = project(grad, side, p, q)
    assert tuple(low.shape) == low_rank_shape(shape, side, rank)
    # Singular vectors carry ~1e-5 fp32 error, so projections are compared at an absolute tolerance well below
    # the O(1) error a wrong side or a missing transpose would give.
    torch.testing.assert_close(low, reference_project(grad, SIDE_NAMES[side], ref_p, ref_q), rtol=1e-3, atol=3e-4)
    update = torch.randn(*low.shape)
    back = project_back(update, side, p, q)
    torch.testing.assert_close(
        back, reference_project_back(update, SIDE_NAMES[side], ref_p, ref_q), rtol=1e-3, atol=3e-4
    )
    weight = torch.randn(*shape)
    expected = weight - 0.3 * back
    add_projected_back_(weight, update, side, p, q, alpha=-0.3)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)
    # A decoupled weight decay folded into the same pass: beta · weight + alpha · back.
    decayed = weight * 0.9 - 0.3 * back
    add_projected_back_(weight, update, side, p, q, alpha=-0.3, beta=0.9)
    torch.testing.assert_close(weight, decayed, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        add_projected_back_(weight, update, side, p, q, alpha=-0.3, beta=0.0)


def test_bases_are_orthonormal_and_span_the_top_singular_space():
    grad = torch.randn(40, 30)
    p = left_basis(grad, 5, method="exact")
    torch.testing.assert_close(p.T @ p, torch.eye(5), atol=1e-5, rtol=0)
    u, _, _ = torch.linalg.svd(grad)
    # Same subspace as the top-5 left singular vectors: the projector onto it is identical.
    torch.testing.assert_close(p @ p.T, u[:, :5] @ u[:, :5].T, atol=1e-5, rtol=0)


def test_sign_canonicalisation_matches_reference_and_is_idempotent():
    basis = torch.randn(12, 5)
    ours = canonicalize_signs(basis.clone())
    torch.testing.assert_close(ours, reference_canonical_signs(basis), rtol=0, atol=0)
    torch.testing.assert_close(canonicalize_signs(ours.clone()), ours, rtol=0, atol=0)
    # The basis of -G equals the basis of G: the result does not depend on the sign returned by the SVD.
    grad = torch.randn(20, 9)
    torch.testing.assert_close(left_basis(grad, 3, "exact"), left_basis(-grad, 3, "exact"), atol=1e-5, rtol=0)


def _low_rank_plus_noise(m, n, rank, noise, generator):
    a = torch.randn(m, rank, generator=generator)
    b = torch.randn(rank, n, generator=generator)
    spectrum = torch.logspace(1, 0, rank)
    return (a * spectrum) @ b + noise * torch.randn(m, n, generator=generator)


@pytest.mark.parametrize("power_iters", [1, 2])
@pytest.mark.parametrize("shape", [(300, 120), (96, 257)])
def test_randomized_refresh_captures_at_least_99_percent_of_exact_energy(power_iters, shape):
    generator = torch.Generator().manual_seed(1)
    rank = 16
    grad = _low_rank_plus_noise(*shape, rank=24, noise=0.5, generator=generator)
    exact = left_basis(grad, rank, "exact")
    rng = torch.Generator().manual_seed(7)
    randomized = left_basis(grad, rank, "randomized", power_iters=power_iters, oversample=8, generator=rng)
    captured = torch.linalg.matrix_norm(randomized.T @ grad) ** 2 / torch.linalg.matrix_norm(exact.T @ grad) ** 2
    assert captured >= 0.99
    torch.testing.assert_close(randomized.T @ randomized, torch.eye(rank), atol=1e-4, rtol=0)


@pytest.mark.parametrize("decay", [0.5, 1.0, 3.0])
def test_randomized_basis_spans_the_exact_top_subspace_when_there_is_a_gap(decay):
    """The final rotation (an eigh of the sketch's Gram matrix) gives the exact top-r subspace, not just its energy:
    with a spectral gap after r, the projectors of the randomized and the exact bases agree."""
    generator = torch.Generator().manual_seed(5)
    m, n, rank = 120, 300, 10
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=generator))
    spectrum = torch.arange(1, m + 1, dtype=torch.float32) ** (-decay)
    spectrum[rank:] *= 0.01  # the gap
    grad = (u * spectrum) @ v.T
    exact = left_basis(grad, rank, "exact")
    randomized = left_basis(grad, rank, "randomized", power_iters=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(randomized @ randomized.T, exact @ exact.T, atol=1e-4, rtol=0)
    # Canonical signs make the vectors themselves agree where the singular values are distinct.
    torch.testing.assert_close(randomized[:, :3], exact[:, :3], atol=1e-3, rtol=0)


@pytest.mark.parametrize("magnitude", [1e19, 1e-25])
def test_randomized_basis_of_huge_or_tiny_gradients_is_finite_and_scale_free(magnitude):
    """The Gram matrix of the last stage squares singular values: without normalisation σ₁ = 1e19 overflows fp32
    (a NaN basis) and 1e-25 underflows (an arbitrary one)."""
    generator = torch.Generator().manual_seed(2)
    grad = _low_rank_plus_noise(64, 128, rank=6, noise=0.01, generator=generator)
    reference = left_basis(grad, 4, "randomized", generator=torch.Generator().manual_seed(0))
    scaled = left_basis(grad * magnitude, 4, "randomized", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, reference, atol=1e-4, rtol=0)


def test_randomized_without_power_iterations_is_worse_on_flat_spectra():
    # Guards the test above against passing trivially: on a flat noisy spectrum a sketch without power iterations
    # does lose energy, so the >= 0.99 bound is a real constraint.
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(300, 200, generator=generator)
    exact = left_basis(grad, 16, "exact")
    rough = left_basis(grad, 16, "randomized", power_iters=0, oversample=2, generator=torch.Generator().manual_seed(0))
    captured = torch.linalg.matrix_norm(rough.T @ grad) ** 2 / torch.linalg.matrix_norm(exact.T @ grad) ** 2
    assert captured < 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decomposition_runs_in_fp32_and_returns_the_gradient_dtype(dtype, monkeypatch):
    seen = []
    original_svd = torch.linalg.svd

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.dtype)
        return original_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    grad = torch.randn(20, 12).to(dtype)
    for method in ("exact", "randomized"):
        p, q = compute_bases(grad, Side.FULL, 4, method=method, generator=torch.Generator().manual_seed(0))
        assert p.dtype == dtype and q.dtype == dtype
    assert seen and all(d == torch.float32 for d in seen)


def test_randomized_basis_is_deterministic_for_a_seed():
    grad = torch.randn(50, 40)
    a = left_basis(grad, 6, "randomized", generator=torch.Generator().manual_seed(5))
    b = left_basis(grad, 6, "randomized", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
