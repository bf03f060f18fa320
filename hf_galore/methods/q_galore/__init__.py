"""Q-GaLore (Zhang et al., 2024): GaLore with INT8 weights, INT4 bases and a lazy, layer-adaptive refresh.

`hf_galore.q_galore` is this package: [`quantize_model`], [`merge`] (formerly `merge_to_dense`,
still accepted with a `FutureWarning`), [`from_pretrained`].
"""

from . import spec
from .config import QGaLoreConfig
from .optimizer import QGaLoreAdamW8bit, QGaLoreAdamW8bitLayerwise
from .transform import QUANT_METHOD, from_pretrained, int8_targets, merge, merge_to_dense, quantize_model

__all__ = [
    "QUANT_METHOD",
    "QGaLoreAdamW8bit",
    "QGaLoreAdamW8bitLayerwise",
    "QGaLoreConfig",
    "from_pretrained",
    "int8_targets",
    "merge",
    "merge_to_dense",
    "quantize_model",
    "spec",
]
