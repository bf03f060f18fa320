"""[`QGaLoreConfig`]: Q-GaLore's INT4 bases, INT8 weights and lazy refresh."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from ...configs import OptionsMixin, check_condition, check_number


@dataclass
class QGaLoreConfig(OptionsMixin):
    """Configuration of Q-GaLore (Zhang et al., 2024, arXiv:2407.08296): GaLore with INT8 weights, INT4 bases and
    a lazy, layer-adaptive subspace refresh.

    The defaults are the paper's (`--proj_bits 4 --proj_group_size 256 --weight_bits 8 --weight_group_size 256
    --cos_threshold 0.4 --gamma_proj 2 --queue_size 5`), plus a cap on the refresh gap that the published code lacks.

    Args:
        proj_bits (`int`, defaults to 4):
            Bits of the stored projection bases, 4 (packed two per byte) or 8. The bases are dequantized for each
            projection; the gradients and the SVD stay in full precision.
        proj_group_size (`int`, defaults to 256):
            Elements of a basis sharing one fp32 scale and zero.
        weight_bits (`int`, defaults to 8):
            Bits of the targeted Linear weights (only 8 is supported).
        weight_group_size (`int`, defaults to 256):
            Elements (row-major) of an INT8 weight sharing one fp32 scale and zero.
        stochastic_round (`bool`, defaults to `True`):
            Requantize updated INT8 weights with stochastic rounding (unbiased, so updates smaller than a
            quantization step are not lost); `false` rounds to nearest.
        cos_threshold (`float`, defaults to 0.4):
            A weight's refresh gap grows when the mean |cosine similarity| between the leading singular vectors of
            successive bases, over the last `queue_size` refreshes, is at least this, in [0, 1].
        gamma_proj (`float`, defaults to 2.0):
            Factor by which a stable weight's refresh gap grows (≥ 1; 1 disables the lazy refresh).
        queue_size (`int`, defaults to 5):
            Number of successive similarities averaged before the gap may grow; the queue restarts after a growth,
            so every growth needs `queue_size` fresh confirmations.
        max_proj_gap (`int`, *optional*):
            Upper bound of a weight's refresh gap; `None` means 16 × `update_proj_gap`.
        sr_seed (`int`, defaults to 0):
            Seed of the stochastic rounding, mixed with the step and the weight's index, so every data-parallel rank
            rounds identically and a resumed run reproduces an uninterrupted one.
    """

    section: ClassVar[str] = "Q-GaLore quantization"

    proj_bits: int = field(default=4, metadata={"help": "Bits of the stored projection bases (4 packed, or 8)."})
    proj_group_size: int = field(default=256, metadata={"help": "Elements per scale/zero of the bases."})
    weight_bits: int = field(default=8, metadata={"help": "Bits of the targeted Linear weights (8)."})
    weight_group_size: int = field(default=256, metadata={"help": "Elements per scale/zero of the INT8 weights."})
    stochastic_round: bool = field(default=True, metadata={"help": "Stochastic rounding of the INT8 weight update."})
    cos_threshold: float = field(default=0.4, metadata={"help": "Mean |cos| above which the refresh gap grows."})
    gamma_proj: float = field(default=2.0, metadata={"help": "Growth factor of a stable weight's refresh gap."})
    queue_size: int = field(default=5, metadata={"help": "Similarities averaged before the gap may grow."})
    max_proj_gap: int | None = field(default=None, metadata={"help": "Cap of the refresh gap (none: 16×gap)."})
    sr_seed: int = field(default=0, metadata={"help": "Seed of the stochastic rounding."})

    def __post_init__(self) -> None:
        check_condition(self.proj_bits in (4, 8), f"proj_bits={self.proj_bits} is not valid; choose 4 or 8.")
        check_condition(
            self.weight_bits == 8, f"weight_bits={self.weight_bits} is not supported; only 8 is (set weight_bits=8)."
        )
        for name in ("proj_group_size", "weight_group_size", "queue_size"):
            value = getattr(self, name)
            check_condition(value >= 1, f"{name} must be a positive integer, got {value}.")
        check_number("cos_threshold", self.cos_threshold, 0, 1)
        check_number("gamma_proj", self.gamma_proj, 1)  # 1 disables the lazy refresh
        check_condition(
            self.max_proj_gap is None or self.max_proj_gap >= 1,
            f"max_proj_gap must be ≥ 1 or none, got {self.max_proj_gap}.",
        )


#: Deprecated (formerly `hf_galore.optim.q_galore.Q_GALORE_DEFAULTS`): QGaLoreConfig's defaults.
Q_GALORE_DEFAULTS: dict[str, object] = {f.name: f.default for f in dataclasses.fields(QGaLoreConfig)}
