"""hf_galore: GaLore-family memory-efficient optimizers as first-class `optim=` choices of the HF Trainer.

`import hf_galore` registers our optimizer names with the stock `transformers.TrainingArguments` / `Trainer`
(reversible with [`unregister`]); everything else is importable without side effects.

Example:
    ```python
    >>> import hf_galore  # registers galore_adamw, galore_adamw_8bit, galore_adafactor and *_layerwise
    >>> from transformers import Trainer, TrainingArguments
    >>> args = TrainingArguments("out", optim="galore_adamw", optim_target_modules="all-linear",
    ...                          optim_args="rank=8, update_proj_gap=200, scale=2")
    >>> Trainer(model=model, args=args, train_dataset=ds).train()
    ```
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import q_galore, welore
from .configs import (
    AdafactorConfig,
    Blockwise8bitConfig,
    FloraConfig,
    GaLoreConfig,
    MultiTensorConfig,
    QGaLoreConfig,
    WeLoreConfig,
    parse_optim_args,
)
from .errors import (
    HfGaloreError,
    InvalidConfigError,
    MissingDependencyError,
    NotAPlaceholderError,
    NoTargetModulesError,
    OptimizerMismatchError,
    UnknownOptimizerError,
    UnsupportedSetupError,
    UnsupportedTransformersVersionError,
)
from .integrations.callbacks import WeLoreCallback
from .integrations.transformers import is_registered, optimizer_cls_and_kwargs, register, unregister
from .modules.int8_linear import Int8Linear
from .modules.low_rank_linear import LowRankLinear
from .optim import (
    GaLoreAdafactor,
    GaLoreAdafactorLayerwise,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
    LowRankOptimizer,
)
from .optim.flora import FloraAdafactor, FloraAdafactorLayerwise, FloraAdamW, FloraAdamWLayerwise
from .optim.q_galore import QGaLoreAdamW8bit, QGaLoreAdamW8bitLayerwise
from .registry import REGISTRY, OptimizerSpec, build_param_groups, get_spec, register_optimizer
from .targeting import TargetResolution, resolve_target_modules

__all__ = [
    "REGISTRY",
    "AdafactorConfig",
    "Blockwise8bitConfig",
    "FloraAdafactor",
    "FloraAdafactorLayerwise",
    "FloraAdamW",
    "FloraAdamWLayerwise",
    "FloraConfig",
    "GaLoreAdafactor",
    "GaLoreAdafactorLayerwise",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreAdamW8bitLayerwise",
    "GaLoreAdamWLayerwise",
    "GaLoreConfig",
    "HfGaloreError",
    "Int8Linear",
    "InvalidConfigError",
    "LowRankLinear",
    "LowRankOptimizer",
    "MissingDependencyError",
    "MultiTensorConfig",
    "NoTargetModulesError",
    "NotAPlaceholderError",
    "OptimizerMismatchError",
    "OptimizerSpec",
    "QGaLoreAdamW8bit",
    "QGaLoreAdamW8bitLayerwise",
    "QGaLoreConfig",
    "TargetResolution",
    "UnknownOptimizerError",
    "UnsupportedSetupError",
    "UnsupportedTransformersVersionError",
    "WeLoreCallback",
    "WeLoreConfig",
    "__version__",
    "build_param_groups",
    "get_spec",
    "is_registered",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "q_galore",
    "register",
    "register_optimizer",
    "resolve_target_modules",
    "unregister",
    "welore",
]

register()
