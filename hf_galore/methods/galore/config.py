"""[`GaLoreConfig`]: the GaLore projection knobs (rank, refresh gap, scale, side, refresh method, basis storage).

The only source of their defaults and ranges: [`LowRankOptimizer`] subclasses derive their defaults from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from ...configs import OptionsMixin, check_condition, check_number

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")
REFRESH_SIGNS = ("svd", "canonical", "aligned", "rotate")


@dataclass
class GaLoreConfig(OptionsMixin):
    """Configuration of GaLore's gradient low-rank projection (Zhao et al., 2024, arXiv:2403.03507).

    The defaults equal transformers' built-in GaLore defaults, so existing `optim_args` strings keep their meaning.

    Args:
        rank (`int`, defaults to 128):
            Rank r of the projection. Optimizer states of a projected m×n weight are r×max(m, n) instead of m×n.
            A weight with min(m, n) ≤ rank gains nothing from projection and falls back to the plain inner update,
            still multiplied by `scale` (its step size stays the projected weights').
        update_proj_gap (`int`, defaults to 200):
            Optimizer steps between two subspace refreshes (T in the paper).
        scale (`float`, defaults to 0.25):
            α: the projected-back update is multiplied by it, so projected weights see an effective lr of lr·α.
        proj_type (`str`, defaults to `"std"`):
            Which side is projected: `std` projects the smaller dimension (left when m < n, right otherwise),
            `reverse_std` the larger one, `left`/`right` force a side, `full` projects both (r×r states).
        svd (`str`, defaults to `"randomized"`):
            How the top-r basis is found at a refresh: `randomized` (range finder, ms even for 4096×11008) or
            `exact` (full fp32 SVD, as in the reference implementation; seconds on large matrices).
        power_iters (`int`, defaults to 1):
            Power iterations of the randomized range finder. With `oversample=32`, 1 keeps ≥ 0.995 of the exact
            top-r energy on every one of 111 real fine-tuning gradients (MiniLM, r = 8, 32, 128;
            `benchmarks/refresh_energy.py`), 2 keeps ≥ 0.9996; 0 drops to 0.88.
        oversample (`int`, defaults to 32):
            Extra random columns of the range finder. With 1 power iteration, 8 extra columns kept only 0.965 of
            the exact energy on the worst of those gradients at r = 8 (0.976 at r = 32); 32 costs a few percent
            more at large ranks and keeps ≥ 0.995.
        stagger (`bool`, defaults to `False`):
            Spread later refreshes of the projected weights evenly over the gap instead of refreshing all of
            them on the same step (the first basis is always computed on a weight's first step).
        seed (`int`, defaults to 0):
            Seed of the range finder's random test matrices (mixed with the weight's index and refresh count,
            so every run and every data-parallel rank draws the same matrices).
        basis_bits (`int`, defaults to 16):
            How the projection bases are stored between refreshes: 16 keeps them in the gradient's dtype; 8 or 4
            stores them quantized group-wise (asymmetric, fp32 scale and zero per `basis_group_size` elements; 4
            packed two per byte, as Q-GaLore does) and dequantizes them for each projection. For a LLaMA-7B shape
            at rank 1024 the bf16 bases take 1.75 GiB, 8-bit ones 0.89 GiB, 4-bit ones 0.46 GiB.
        basis_group_size (`int`, defaults to 256):
            Elements sharing one scale and zero of a quantized basis.
        refresh_signs (`str`, defaults to `"rotate"`):
            How a refreshed basis relates to the moments carried over from the previous one: `svd` keeps the
            decomposition's signs (galore-torch), `canonical` flips each vector so its largest entry is positive,
            `aligned` flips each vector whose dot product with the previous basis' vector is negative, `rotate`
            aligns and also rotates the moments into the new basis (the lowest loss on all three measured setups,
            `benchmarks/refresh_signs.py`; see docs/methods/galore.md).
    """

    section: ClassVar[str] = "GaLore projection"

    rank: int = field(default=128, metadata={"help": "Projection rank r."})
    update_proj_gap: int = field(default=200, metadata={"help": "Steps between subspace refreshes (T)."})
    scale: float = field(default=0.25, metadata={"help": "Scale α of the projected-back update."})
    proj_type: str = field(default="std", metadata={"help": f"Projected side, one of {PROJ_TYPES}."})
    svd: str = field(default="randomized", metadata={"help": f"Refresh method, one of {SVD_METHODS}."})
    power_iters: int = field(default=1, metadata={"help": "Power iterations of the randomized range finder."})
    oversample: int = field(default=32, metadata={"help": "Oversampling columns of the randomized range finder."})
    stagger: bool = field(default=False, metadata={"help": "Spread refreshes of different weights over the gap."})
    seed: int = field(default=0, metadata={"help": "Seed of the range finder's random test matrices."})
    basis_bits: int = field(default=16, metadata={"help": "Bits of the stored bases: 16 (gradient dtype), 8 or 4."})
    basis_group_size: int = field(default=256, metadata={"help": "Elements per scale/zero of 8/4-bit bases."})
    refresh_signs: str = field(
        default="rotate", metadata={"help": f"Basis signs at a refresh, one of {REFRESH_SIGNS}."}
    )

    def __post_init__(self) -> None:
        check_condition(self.rank >= 1, f"rank must be a positive integer, got {self.rank}.")
        check_condition(
            self.basis_bits in (4, 8, 16),
            f"basis_bits={self.basis_bits} is not valid; choose 16 (bases in the gradient dtype), 8 or 4.",
        )
        check_condition(self.basis_group_size >= 1, f"basis_group_size must be ≥ 1, got {self.basis_group_size}.")
        check_condition(self.update_proj_gap >= 1, f"update_proj_gap must be ≥ 1, got {self.update_proj_gap}.")
        check_number("scale", self.scale, 0, low_open=True)
        check_condition(
            self.proj_type in PROJ_TYPES,
            f"proj_type={self.proj_type!r} is not valid; choose one of {', '.join(PROJ_TYPES)}.",
        )
        check_condition(
            self.svd in SVD_METHODS, f"svd={self.svd!r} is not valid; choose one of {', '.join(SVD_METHODS)}."
        )
        check_condition(
            self.refresh_signs in REFRESH_SIGNS,
            f"refresh_signs={self.refresh_signs!r} is not valid; choose one of {', '.join(REFRESH_SIGNS)}.",
        )
        check_condition(self.power_iters >= 0, f"power_iters must be ≥ 0, got {self.power_iters}.")
        check_condition(self.oversample >= 0, f"oversample must be ≥ 0, got {self.oversample}.")


#: Deprecated (what `hf_galore.optim.base.LOW_RANK_DEFAULTS` held): `low_rank` plus GaLoreConfig's defaults.
#: Use `GaLoreAdamW.low_rank_defaults()` or the dataclass' fields.
LOW_RANK_DEFAULTS: dict[str, object] = {
    "low_rank": False,
    **{f.name: f.default for f in dataclasses.fields(GaLoreConfig)},
}
