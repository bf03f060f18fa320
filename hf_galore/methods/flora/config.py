"""FLoRA's configs: the projection ([`FloraConfig`]), its Adafactor variant and gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...configs import AdafactorConfig, OptionsMixin, check_condition

FLORA_PROJ_TYPES = ("std", "reverse_std", "left", "right")


@dataclass
class FloraConfig(OptionsMixin):
    """Configuration of FLoRA's random-projection compression (Hao et al., 2024, arXiv:2402.03293).

    Each targeted m×n weight keeps its first moment compressed through a Gaussian random projection (r×n or m×r)
    that is regenerated from a seed, never stored, and resampled every `kappa` optimizer steps. With gradient
    accumulation, micro-step gradients are also accumulated compressed (see [`FloraAccumulationConfig`]).

    Args:
        rank (`int`, defaults to 128):
            Rank r of the random projections. Must not exceed min(m, n) of any targeted weight (a weight with
            min(m, n) = rank falls back to the plain update: compressing it would save nothing).
        kappa (`int`, defaults to 1000):
            Optimizer steps between two resamplings of the momentum projection (κ in the paper); the compressed
            momentum is carried over to the new projection at each resampling.
        proj_type (`str`, defaults to `"std"`):
            Which side is compressed: `std` the smaller dimension (left when m < n, right otherwise), `reverse_std`
            the larger one, `left`/`right` force a side. FLoRA's projections are one-sided, so `full` is not valid.
        seed (`int`, defaults to 0):
            Base seed of the projections, mixed with the weight's index and a resampling counter, so every run and
            every data-parallel rank regenerates the same matrices.
    """

    section: ClassVar[str] = "FLoRA projection"

    rank: int = field(default=128, metadata={"help": "Rank r of the random projections."})
    kappa: int = field(default=1000, metadata={"help": "Steps between momentum-projection resamplings (κ)."})
    proj_type: str = field(default="std", metadata={"help": f"Compressed side, one of {FLORA_PROJ_TYPES}."})
    seed: int = field(default=0, metadata={"help": "Base seed of the random projections."})

    def __post_init__(self) -> None:
        check_condition(
            self.rank >= 1, f"rank must be a positive integer, got {self.rank}. Set e.g. optim_args='rank=64'."
        )
        check_condition(
            isinstance(self.kappa, int) and not isinstance(self.kappa, bool) and self.kappa >= 1,
            f"kappa must be a positive integer (steps between resamplings), got {self.kappa}. "
            "Set e.g. optim_args='kappa=1000'.",
        )
        check_condition(
            self.proj_type in FLORA_PROJ_TYPES,
            f"proj_type={self.proj_type!r} is not valid for FLoRA; choose one of {', '.join(FLORA_PROJ_TYPES)}.",
        )
        check_condition(self.seed >= 0, f"seed must be ≥ 0, got {self.seed}.")


@dataclass
class FloraAdafactorConfig(AdafactorConfig):
    """Adafactor knobs of `flora_adafactor`: those of [`AdafactorConfig`], with momentum on by default.

    FLoRA's point is a compressed first moment, so `beta1` defaults to 0.9 here (`beta1=none` gives plain
    Adafactor, with nothing to compress).
    """

    beta1: float | None = field(default=0.9, metadata={"help": "First-moment coefficient (none = no momentum)."})


FLORA_ACCUMULATION = ("compressed", "full")


@dataclass
class FloraAccumulationConfig(OptionsMixin):
    """How FLoRA accumulates gradients over `gradient_accumulation_steps` (checked before training; not an optimizer
    hyperparameter).

    Args:
        accumulation (`str`, defaults to `"compressed"`):
            `compressed`: micro-step gradients of the targeted weights are accumulated as m×r (or r×n) random
            projections in backward hooks (every FLoRA name; refuses fp16 and `nn.DataParallel`). `full`: let the
            Trainer accumulate full-size gradients (non-layer-wise names only; only the momentum is compressed).
    """

    section: ClassVar[str] = "FLoRA accumulation"
    optimizer_kwargs: ClassVar[bool] = False

    accumulation: str = field(
        default="compressed", metadata={"help": f"Gradient accumulation, one of {FLORA_ACCUMULATION}."}
    )

    def __post_init__(self) -> None:
        check_condition(
            self.accumulation in FLORA_ACCUMULATION,
            f"accumulation={self.accumulation!r} is not valid; choose one of {', '.join(FLORA_ACCUMULATION)}.",
        )
