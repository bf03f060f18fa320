"""Q-GaLore (Zhang et al., 2024): GaLore with INT8 weights, INT4 bases and a lazy, layer-adaptive refresh.

`hf_galore.q_galore` is this package: [`quantize_model`], [`merge`] (formerly `merge_to_dense`,
still accepted with a `FutureWarning`), [`from_pretrained`].
"""

from ...utils.deprecation import moved_attributes
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


# Deprecated: Q-GaLore's / WeLore's registry hooks and record keys lived in the old `hf_galore.q_galore` module.
__getattr__ = moved_attributes(
    __name__,
    {
        "prepare_model": "hf_galore.methods.q_galore.spec",
        "build_groups": "hf_galore.methods.q_galore.spec",
        "check_setup": "hf_galore.methods.q_galore.spec",
        "LEGACY_CONFIG_KEY": "hf_galore.methods.q_galore.transform",
    },
)
