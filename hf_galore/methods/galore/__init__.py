"""GaLore (Zhao et al., 2024): the gradient projected onto a periodically refreshed rank-r subspace."""

from . import spec
from .config import GaLoreConfig
from .optimizer import (
    GaLoreAdafactor,
    GaLoreAdafactorLayerwise,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
)

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdafactorLayerwise",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdamW8bitLayerwise",
    "GaLoreAdamWLayerwise",
    "GaLoreConfig",
    "spec",
]
