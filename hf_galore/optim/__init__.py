"""torch.optim optimizers of hf_galore (never imports transformers)."""

from .base import LowRankOptimizer
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .layerwise import (
    GaLoreAdafactorLayerwise,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
    LayerwiseMixin,
    is_layerwise,
)

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdafactorLayerwise",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdamW8bitLayerwise",
    "GaLoreAdamWLayerwise",
    "LayerwiseMixin",
    "LowRankOptimizer",
    "is_layerwise",
]
