"""Registration of GaLore's `optim=` names: the six `galore_*` names transformers itself defines.

Where transformers' behaviour is observable it is followed (`transformers_name=True`): `"all-linear"` includes the
output head, and `Trainer.get_learning_rates()` shows transformers' grouping.
"""

from __future__ import annotations

from typing import Any

from ...configs import AdafactorConfig, Blockwise8bitConfig, MultiTensorConfig
from ...registry import OptimizerSpec, register_optimizer
from .config import GaLoreConfig
from .optimizer import (
    GaLoreAdafactor,
    GaLoreAdafactorLayerwise,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
)


def _galore_spec(name: str, cls: type, configs: tuple[type, ...], summary: str, **kwargs: Any) -> OptimizerSpec:
    return register_optimizer(
        OptimizerSpec(
            name=name,
            method="GaLore",
            optimizer_cls=cls,
            config_classes=configs,
            summary=summary,
            transformers_name=True,
            **kwargs,
        )
    )


_galore_spec(
    "galore_adamw",
    GaLoreAdamW,
    (GaLoreConfig, MultiTensorConfig),
    "GaLore with fp32 Adam states of the projected gradient.",
)
_galore_spec(
    "galore_adamw_8bit",
    GaLoreAdamW8bit,
    (GaLoreConfig, Blockwise8bitConfig, MultiTensorConfig),
    "GaLore with 8-bit blockwise Adam states (bitsandbytes).",
    needs_bitsandbytes=True,
)
_galore_spec(
    "galore_adafactor",
    GaLoreAdafactor,
    (GaLoreConfig, AdafactorConfig),
    "GaLore with Adafactor's factored second moment.",
    adam_style=False,
)
_galore_spec(
    "galore_adamw_layerwise",
    GaLoreAdamWLayerwise,
    (GaLoreConfig, MultiTensorConfig),
    "galore_adamw, each weight updated in its backward hook and its gradient freed.",
    layerwise=True,
)
_galore_spec(
    "galore_adamw_8bit_layerwise",
    GaLoreAdamW8bitLayerwise,
    (GaLoreConfig, Blockwise8bitConfig, MultiTensorConfig),
    "galore_adamw_8bit, each weight updated in its backward hook and its gradient freed.",
    layerwise=True,
    needs_bitsandbytes=True,
)
_galore_spec(
    "galore_adafactor_layerwise",
    GaLoreAdafactorLayerwise,
    (GaLoreConfig, AdafactorConfig),
    "galore_adafactor, each weight updated in its backward hook and its gradient freed.",
    layerwise=True,
    adam_style=False,
)
