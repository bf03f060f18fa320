"""The optimizer engines of hf_galore: the low-rank step skeleton, its inner engines (AdamW 32/8-bit, Adafactor)
the layer-wise (optimizer-in-backward) mixin, and [`BackwardAllReduce`] (the data-parallel averaging of gradients that
DDP cannot own). Each engine also states the bytes of the storage it allocates
([`ParamBytes`], from `param_bytes`), which `hf_galore.memory` sums. Never imports transformers or a method; the optimizers users
pick (`GaLoreAdamW`, `FloraAdamW`, ...) are declared in `hf_galore.methods.<method>.optimizer` and exported from
`hf_galore`.
"""

from ..utils.deprecation import moved_attributes
from .adafactor import LowRankAdafactor
from .adamw import LowRankAdamW, LowRankAdamW8bit
from .allreduce import BackwardAllReduce
from .base import LowRankOptimizer, ParamBytes
from .checkpoint import check_dcp_checkpoint
from .layerwise import LayerwiseMixin, is_layerwise

__all__ = [
    "BackwardAllReduce",
    "LayerwiseMixin",
    "LowRankAdafactor",
    "LowRankAdamW",
    "LowRankAdamW8bit",
    "LowRankOptimizer",
    "ParamBytes",
    "check_dcp_checkpoint",
    "is_layerwise",
]

# Deprecated: the GaLore optimizers were exported here before they moved to `hf_galore.methods.galore`.
__getattr__ = moved_attributes(
    __name__,
    dict.fromkeys(
        (
            "GaLoreAdafactor",
            "GaLoreAdafactorLayerwise",
            "GaLoreAdamW",
            "GaLoreAdamW8bit",
            "GaLoreAdamW8bitLayerwise",
            "GaLoreAdamWLayerwise",
        ),
        "hf_galore.methods.galore.optimizer",
    ),
)
