"""Group-wise asymmetric integer quantization (INT8 and packed INT4) with optional stochastic rounding.

Pure torch. A tensor is flattened row-major and cut into groups of `group_size` consecutive elements (the last group
is padded with copies of the last element, which changes neither its minimum nor its maximum). Each group stores

* `scale = (max − min) / (2^bits − 1)` (fp32), and
* `zero = min` (fp32): the *float* value of code 0,

and each element the code `q = round((x − min) / scale)` in `[0, 2^bits − 1]`, so `x ≈ q · scale + zero`.

Keeping the zero point as a float offset instead of a clamped integer is what keeps single-sign groups intact: the
published Q-GaLore quantizer clamps `−round(min/scale)` into the code range, so an all-positive group such as
`[1, 2]` collapses to `[1, 1]` (unsloth#10841). Here every group uses its whole code range, its minimum is
reproduced exactly (its maximum to fp32 round-off), and a constant group (max = min) gets scale 1 and code 0, i.e. it is reproduced exactly too.

Stochastic rounding (`generator` given) rounds `y` up with probability `frac(y)`, so `E[q] = y`: updates much
smaller than one quantization step survive on average instead of being rounded away. The uniform draws come from an
explicit `torch.Generator`, so a given seed always produces the same codes.

INT4 codes are packed two per byte (element `2i` in the low nibble, `2i + 1` in the high nibble).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}.")


def num_groups(numel: int, group_size: int) -> int:
    """Number of quantization groups of a tensor with `numel` elements."""
    if group_size < 1:
        raise ValueError(f"group_size must be ≥ 1, got {group_size}.")
    return max(math.ceil(numel / group_size), 1)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`x` flattened and padded (with its last element) to a (groups, group_size) fp32 view."""
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = num_groups(flat.numel(), group_size) * group_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` group-wise to unsigned `bits`-bit codes.

    Args:
        x (`torch.Tensor`): Any floating tensor (computed in fp32).
        bits (`int`, defaults to 8): 8 or 4.
        group_size (`int`, defaults to 256): Consecutive elements (row-major) sharing one scale and zero.
        generator (`torch.Generator`, *optional*): When given, round stochastically with uniform draws from it
            (it must live on `x`'s device); otherwise round to nearest.

    Returns:
        `(codes, scales, zeros)`: `codes` is uint8 with `x`'s shape (one code per byte, see [`pack_int4`]);
        `scales` and `zeros` are fp32 with one entry per group.
    """
    _check_bits(bits)
    qmax = 2**bits - 1
    groups = _grouped(x, group_size)
    lo = groups.amin(dim=1)
    hi = groups.amax(dim=1)
    span = hi - lo
    # A constant group has no range: scale 1 and code 0 decode to exactly `lo`.
    scales = torch.where(span > 0, span / qmax, torch.ones_like(span))
    y = (groups - lo[:, None]) / scales[:, None]
    if generator is None:
        y = torch.round(y)
    else:
        noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
        y = torch.floor(y + noise)
    codes = y.clamp_(0, qmax).to(torch.uint8).reshape(-1)[: x.numel()].view(x.shape)
    return codes, scales, lo


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of [`quantize`]: `codes · scale + zero` per group, computed in fp32 and returned in `dtype`."""
    numel = codes.numel()
    groups = scales.numel()
    flat = codes.reshape(-1).to(torch.float32)
    pad = groups * group_size - numel
    if pad < 0:
        raise ValueError(
            f"{numel} codes need more than {groups} groups of {group_size}; the metadata is inconsistent."
        )
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    values = flat.view(groups, group_size).mul_(scales[:, None]).add_(zeros[:, None])
    return values.reshape(-1)[:numel].view(codes.shape).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in `[0, 15]` two per byte: a flat uint8 tensor of `ceil(numel / 2)` bytes."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of [`pack_int4`]: uint8 codes of `shape`."""
    numel = math.prod(shape)
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel].view(tuple(shape))


def quantize_packed(
    x: torch.Tensor, bits: int, group_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`quantize`], with 4-bit codes packed two per byte (8-bit codes are returned flat)."""
    codes, scales, zeros = quantize(x, bits, group_size, generator)
    packed = pack_int4(codes) if bits == 4 else codes.reshape(-1)
    return packed, scales, zeros


def dequantize_packed(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of [`quantize_packed`]."""
    codes = unpack_int4(packed, shape) if bits == 4 else packed.view(tuple(shape))
    return dequantize(codes, scales, zeros, group_size, dtype)
