"""`nn.Module` replacements of hf_galore (importable without transformers)."""

from .int8_linear import Int8Linear
from .low_rank_linear import LowRankLinear

__all__ = ["Int8Linear", "LowRankLinear"]
