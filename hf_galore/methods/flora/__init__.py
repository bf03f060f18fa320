"""FLoRA (Hao et al., 2024): momentum and gradient accumulation compressed by seeded random projections."""

from . import spec
from .config import FloraAccumulationConfig, FloraAdafactorConfig, FloraConfig
from .optimizer import (
    FloraAdafactor,
    FloraAdafactorAccumulating,
    FloraAdafactorLayerwise,
    FloraAdamW,
    FloraAdamWAccumulating,
    FloraAdamWLayerwise,
)

__all__ = [
    "FloraAccumulationConfig",
    "FloraAdafactor",
    "FloraAdafactorAccumulating",
    "FloraAdafactorConfig",
    "FloraAdafactorLayerwise",
    "FloraAdamW",
    "FloraAdamWAccumulating",
    "FloraAdamWLayerwise",
    "FloraConfig",
    "spec",
]
