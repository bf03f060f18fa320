"""Seeded Gaussian random projections (FLoRA, Hao et al., 2024, arXiv:2402.03293). Pure tensor math; imports only
torch.

A projection is a `dim×r` matrix P with i.i.d. N(0, 1/r) entries, so E[P Pᵀ] = I_dim and compressing then
decompressing a gradient is unbiased. In the paper's notation the left projection is A = Pᵀ (r×m) and the right one
is B = P (n×r). The conventions are those of [`hf_galore.projection.subspace`], so `project` / `project_back` apply:

* left side (m < n): compressed gradient Pᵀ G (r×n), decompression P C;
* right side (m ≥ n): compressed gradient G P (m×r), decompression C Pᵀ.

A projection is never stored: it is regenerated from an int seed whenever it is needed, **on the weight's device**,
by a counter-based generator written in tensor ops ([`GENERATOR_PHILOX`]):

1. Philox4x32-10 (Salmon et al., SC 2011; the generator of cuRAND and of torch's CUDA RNG) maps (counter, 64-bit key
   = seed) to four 32-bit words. It runs on int64 tensors holding values in [0, 2³²): every intermediate stays in
   [0, 2⁴⁹) (32×32-bit products are split into 16-bit halves), so no operation overflows and every device computes
   the same integers;
2. Box-Muller turns two words into two N(0, 1) values in float64 using only IEEE-754 operations that are correctly
   rounded on every conforming device (+, −, ×, ÷, sqrt, exact int→float conversion, `frexp`, selections): the
   logarithm, sine and cosine are short polynomials evaluated op by op (one torch kernel per operation, so there is
   no fused multiply-add whose presence could differ between devices), not library calls, whose last bits differ
   between CPU libm/SLEEF and CUDA;
3. one multiplication by r^-1/2 and one rounding to the requested dtype.

So a seed names the same matrix, bit for bit, on every device, every data-parallel rank and after a resume, and no
host work or host-to-device copy is needed. The previous generator ([`GENERATOR_TORCH_CPU`]: `torch.randn` on a
CPU generator, then a copy) is kept for optimizer states written before this one existed.
"""

from __future__ import annotations

import math

import torch

from .subspace import Side, project, project_back

#: Generator versions, stored per weight in FLoRA's optimizer state (`state["generator"]`).
GENERATOR_TORCH_CPU = 0
GENERATOR_PHILOX = 1
GENERATORS = {GENERATOR_TORCH_CPU: "torch CPU generator (legacy)", GENERATOR_PHILOX: "Philox4x32-10 on the device"}

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10


def _mulhilo(a: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a·m for a in [0, 2³²) and m = m_hi·2¹⁶ + m_lo, without overflowing int64.

    a·m = t_hi·2¹⁶ + t_lo with t_lo = a·m_lo, t_hi = a·m_hi, both < 2⁴⁸; the low word is (t_lo + (t_hi mod 2¹⁶)·2¹⁶)
    mod 2³² and the high word is ⌊(t_hi + ⌊t_lo/2¹⁶⌋)/2¹⁶⌋ (all intermediates < 2⁴⁹). In-place where possible: on
    CPU each fresh large buffer costs page faults.
    """
    t_lo = a * m_lo
    t_hi = a * m_hi
    low = t_hi.bitwise_and(0xFFFF).bitwise_left_shift_(16).add_(t_lo).bitwise_and_(_M32)
    high = t_hi.add_(t_lo.bitwise_right_shift_(16)).bitwise_right_shift_(16)
    return high, low


def philox4x32(counters: torch.Tensor, key: int) -> torch.Tensor:
    """Philox4x32-10 of each counter under a 64-bit key.

    Args:
        counters (`torch.Tensor`): int64 tensor of shape `(n,)` with values in [0, 2⁶³), as the 128-bit counter
            (counter mod 2³², counter >> 32, 0, 0).
        key (`int`): The key, in [0, 2⁶⁴) (low word first).

    Returns:
        int64 tensor of shape `(4, n)`: the four output words (values in [0, 2³²)) of each counter.
    """
    device = counters.device
    multipliers = torch.tensor(_PHILOX_M, dtype=torch.int64, device=device).view(2, 1)
    m_lo, m_hi = multipliers & 0xFFFF, multipliers >> 16
    # Words (x0, x2) in `a`, (x1, x3) in `b`: one Philox round is then a handful of ops on (2, n) tensors.
    a = torch.stack([counters & _M32, torch.zeros_like(counters)])
    b = torch.stack([counters >> 32, torch.zeros_like(counters)])
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(_PHILOX_ROUNDS):
        high, low = _mulhilo(a, m_lo, m_hi)
        keys = torch.tensor([[k0], [k1]], dtype=torch.int64, device=device)
        # x0 ← hi(M1·x2) ^ x1 ^ k0, x1 ← lo(M1·x2), x2 ← hi(M0·x0) ^ x3 ^ k1, x3 ← lo(M0·x0)
        a, b = b.bitwise_xor_(keys).bitwise_xor_(high.flip(0)), low.flip(0)
        k0, k1 = (k0 + _PHILOX_W[0]) & _M32, (k1 + _PHILOX_W[1]) & _M32
    return torch.stack([a[0], b[0], a[1], b[1]])


# Taylor coefficients (Python floats: the same float64 constants everywhere).
_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
_ATANH = [1.0 / (2 * k + 1) for k in range(8)]  # ln m = 2·atanh(s), |s| ≤ 0.172: error < 1e-13
_SIN = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(8)]  # on [0, π/4]: error < 1e-14
_COS = [(-1.0) ** k / math.factorial(2 * k) for k in range(9)]


def _horner(z: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """Σ cₖ zᵏ, one IEEE multiplication and one addition per term (separate kernels, so no fused multiply-add)."""
    result = torch.full_like(z, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        result.mul_(z).add_(c)
    return result


def _log_of_uniform(words: torch.Tensor) -> torch.Tensor:
    """ln((w + 1)·2⁻³²) in float64 for 32-bit words w, from frexp and a polynomial (no library logarithm)."""
    mantissa, exponent = torch.frexp((words + 1).to(torch.float64))  # exact: w + 1 = mantissa·2^exponent
    exponent = exponent.to(torch.float64)
    small = mantissa < _SQRT_HALF  # bring the mantissa into [1/√2, √2): |s| ≤ 0.172 below
    mantissa = torch.where(small, mantissa * 2.0, mantissa)
    exponent = torch.where(small, exponent - 1.0, exponent) - 32.0
    s = (mantissa - 1.0) / (mantissa + 1.0)
    log_mantissa = (s * 2.0) * _horner(s * s, _ATANH)
    return exponent * _LN2 + log_mantissa


def _cos_sin_of_turn(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos θ, sin θ) for θ = 2π·w/2³² in float64: the quadrant from the top two bits, then polynomials on [0, π/4]."""
    quadrant = words >> 30
    fraction = (words & 0x3FFFFFFF).to(torch.float64).mul_(2.0**-30)  # exact: position within the quadrant, [0, 1)
    upper = fraction > 0.5
    angle = torch.where(upper, 1.0 - fraction, fraction).mul_(math.pi / 2)  # ψ in [0, π/4]
    square = angle * angle
    sin, cos = _horner(square, _SIN).mul_(angle), _horner(square, _COS)
    # θ = q·π/2 + φ with φ = ψ (lower half) or π/2 − ψ (upper half). cos/sin of φ swap in the upper half, and a
    # quarter turn swaps them again: (cos θ, sin θ) = (±a, ±b) with (a, b) = (sin ψ, cos ψ) when exactly one swap
    # happened, signs by quadrant (exact multiplications by ±1).
    swapped = upper ^ (quadrant & 1).bool()
    a, b = torch.where(swapped, sin, cos), torch.where(swapped, cos, sin)
    signs = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, -1.0, -1.0]], dtype=torch.float64, device=words.device)
    return a.mul_(signs[0][quadrant]), b.mul_(signs[1][quadrant])


def philox_normal(seed: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`count` i.i.d. N(0, 1) values in float64 named by `seed`, bit-identical on every device.

    Counter i gives the values at 4i..4i+3: Box-Muller on its words (w0, w1) and (w2, w3).
    """
    counters = torch.arange((count + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(counters, int(seed))
    radius = (_log_of_uniform(words[0::2]) * -2.0).sqrt()  # (2, n): from w0 and w2, in (0, √(2·32·ln 2)]
    cos, sin = _cos_sin_of_turn(words[1::2])  # from w1 and w3
    values = torch.stack([radius[0] * cos[0], radius[0] * sin[0], radius[1] * cos[1], radius[1] * sin[1]])
    return values.T.reshape(-1)[:count]


def gaussian_projection(
    seed: int,
    dim: int,
    rank: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: int = GENERATOR_PHILOX,
) -> torch.Tensor:
    """The `dim×rank` matrix with i.i.d. N(0, 1/rank) entries named by `seed`.

    Args:
        seed (`int`): Any integer in [0, 2⁶³); the same seed gives the same matrix on every device.
        dim (`int`): The projected dimension (m for the left side, n for the right side).
        rank (`int`): The compressed dimension r.
        device (`torch.device`, *optional*): Where the matrix is generated (and returned). Defaults to CPU.
        dtype (`torch.dtype`, defaults to `torch.float32`): Dtype of the result (drawn in float64, rounded once).
        generator (`int`, defaults to [`GENERATOR_PHILOX`]): [`GENERATOR_PHILOX`] (on the device) or
            [`GENERATOR_TORCH_CPU`] (legacy: `torch.randn` on a CPU generator, then copied).

    Returns:
        `torch.Tensor` of shape `(dim, rank)` with E[P Pᵀ] = I.
    """
    if rank < 1 or dim < 1:
        raise ValueError(f"A projection needs dim ≥ 1 and rank ≥ 1, got dim={dim}, rank={rank}.")
    if generator == GENERATOR_PHILOX:
        values = philox_normal(seed, dim * rank, device) * rank**-0.5
        return values.view(dim, rank).to(dtype)
    if generator != GENERATOR_TORCH_CPU:
        raise ValueError(f"Unknown projection generator {generator!r}; known: {GENERATORS}.")
    cpu_generator = torch.Generator(device="cpu")
    cpu_generator.manual_seed(int(seed))
    matrix = torch.randn(dim, rank, generator=cpu_generator, dtype=torch.float32)
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
