"""WeLore (Jaiswal et al., 2024): split weights by their spectra into trainable low-rank factors (LRC) and frozen
dense matrices (N-LRC), then fine-tune only the factors.

`hf_galore.welore` is this package: [`analyze`], [`compress`], [`merge`], [`from_pretrained`], ...
"""

from ...projection.spectrum import normalize_spectrum, singular_values
from ...utils.deprecation import moved_attributes
from . import spec
from .config import WeLoreConfig
from .optimizer import WeLoreAdamW, WeLoreAdamW8bit
from .transform import (
    QUANT_METHOD,
    TRAINABLE_FLAGS,
    WELORE_OPTIMIZERS,
    MatrixPlan,
    WeLorePlan,
    analyze,
    apply_trainable,
    compress,
    from_pretrained,
    is_compressed,
    merge,
    prepare_for_training,
    resolve_config,
    solve_threshold,
    trainable_parameter_names,
)

__all__ = [
    "QUANT_METHOD",
    "TRAINABLE_FLAGS",
    "WELORE_OPTIMIZERS",
    "MatrixPlan",
    "WeLoreAdamW",
    "WeLoreAdamW8bit",
    "WeLoreConfig",
    "WeLorePlan",
    "analyze",
    "apply_trainable",
    "compress",
    "from_pretrained",
    "is_compressed",
    "merge",
    "normalize_spectrum",
    "prepare_for_training",
    "resolve_config",
    "singular_values",
    "solve_threshold",
    "spec",
    "trainable_parameter_names",
]


# Deprecated: Q-GaLore's / WeLore's registry hooks and record keys lived in the old `hf_galore.welore` module.
__getattr__ = moved_attributes(
    __name__,
    {
        "registry_prepare_model": "hf_galore.methods.welore.spec:prepare_model",
        "registry_build_groups": "hf_galore.methods.welore.spec:build_groups",
        "LEGACY_CONFIG_KEY": "hf_galore.methods.welore.transform",
        "FORMAT_VERSION": "hf_galore.methods.welore.transform",
    },
)
