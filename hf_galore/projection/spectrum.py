"""WeLore's spectral math (pure tensor functions): singular values, min–max normalised spectra, the ranks a
global threshold keeps, and whether a kept rank makes a matrix a low-rank component (LRC).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidConfigError


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D weight, computed in fp32 (whatever its dtype), descending, on the CPU."""
    if weight.dim() != 2:
        raise InvalidConfigError(f"WeLore analyses 2-D weights; got a tensor of shape {tuple(weight.shape)}.")
    return torch.linalg.svdvals(weight.detach().float()).cpu()


def normalize_spectrum(values: torch.Tensor) -> torch.Tensor:
    """Min–max normalised singular values `(s − min s) / (max s − min s)`, in [0, 1].

    A flat spectrum (max = min, e.g. an orthogonal matrix) has no low-rank structure: it maps to all ones, so no
    threshold τ ≤ 1 prunes any of its ranks.
    """
    values = values.float()
    low, high = values.min(), values.max()
    span = high - low
    if span <= torch.finfo(torch.float32).eps * max(float(high), 1e-30):
        return torch.ones_like(values)
    return (values - low) / span


def kept_ranks(sorted_spectra: Sequence[torch.Tensor], tau: float) -> list[int]:
    """Kept rank of each matrix at threshold τ: ranks with normalised value < τ go, at least one stays."""
    kept = []
    for ascending in sorted_spectra:
        pruned = int(torch.searchsorted(ascending, torch.tensor([tau]), right=False))
        kept.append(max(ascending.numel() - pruned, 1))
    return kept


def is_lrc(shape: tuple[int, int], kept: int, min_reduction: float) -> bool:
    """LRC iff the rank reduction exceeds `min_reduction` and the two factors are smaller than the dense matrix.

    The second condition keeps the parameter count a non-increasing function of τ (so bisection is valid) and
    never stores a "compressed" matrix that is larger than the original.
    """
    full = min(shape)
    return (full - kept) / full > min_reduction and kept * (shape[0] + shape[1]) < shape[0] * shape[1]


def params_at(shapes: Sequence[tuple[int, int]], kept: Sequence[int], min_reduction: float) -> int:
    return sum(
        k * (s[0] + s[1]) if is_lrc(s, k, min_reduction) else s[0] * s[1] for s, k in zip(shapes, kept, strict=True)
    )
