"""Registration of WeLore's `optim=` names (`welore_adamw`, `welore_adamw_8bit`): the LRC/N-LRC split as the
model transform, then AdamW over what the split leaves trainable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from ...configs import Blockwise8bitConfig, MultiTensorConfig, find_config
from ...registry import OptimizerSpec, register_optimizer
from ...targeting import TargetSpec, group_parameters
from .config import WeLoreConfig
from .optimizer import WeLoreAdamW, WeLoreAdamW8bit
from .transform import prepare_for_training

logger = logging.getLogger(__name__)


def prepare_model(model: nn.Module, target_modules: TargetSpec | None, configs: Sequence[Any]) -> None:
    """`OptimizerSpec.prepare_model` of `welore_adamw*`: the split, before the optimizer and any DDP wrap.

    With the stock Trainer it first runs at the end of `Trainer.__init__` (see `integrations/transformers.py`), so a
    resumed run loads its checkpoint into the already factorized model.
    """
    prepare_for_training(model, find_config(configs, WeLoreConfig, WeLoreConfig()), target_modules)


def build_groups(
    model: nn.Module,
    target_modules: TargetSpec | None,
    weight_decay: float,
    no_decay_names: set[str] | None = None,
    description: str = "welore",
    configs: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """`OptimizerSpec.build_groups` of `welore_adamw*`: plain AdamW groups over the parameters the split left
    trainable (no projected group). Biases and the Trainer's no-decay names get no weight decay.

    The Trainer computes its no-decay names before the split, so the factors' new bias names are matched by suffix.
    """
    no_decay_names = no_decay_names or set()
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: training %d parameters (LRC factors and opted-in tensors).", description, count)
    return group_parameters(model, [], weight_decay, lambda name: name in no_decay_names or name.endswith("bias"))


def _register_welore() -> None:
    """`welore_adamw` / `welore_adamw_8bit`: the WeLore LRC/N-LRC split as the model transform, then plain AdamW
    ([`WeLoreAdamW`] / [`WeLoreAdamW8bit`]) over what the split leaves trainable.
    """
    welore = dict(method="WeLore", prepare_model=prepare_model, build_groups=build_groups)
    register_optimizer(
        OptimizerSpec(
            name="welore_adamw",
            optimizer_cls=WeLoreAdamW,
            config_classes=(WeLoreConfig, MultiTensorConfig),
            summary="WeLore: compress to low-rank factors (LRC) and train only them, with fp32 AdamW states.",
            **welore,
        )
    )
    register_optimizer(
        OptimizerSpec(
            name="welore_adamw_8bit",
            optimizer_cls=WeLoreAdamW8bit,
            config_classes=(WeLoreConfig, Blockwise8bitConfig, MultiTensorConfig),
            summary="WeLore: compress to low-rank factors (LRC) and train only them, with 8-bit AdamW states.",
            needs_bitsandbytes=True,
            **welore,
        )
    )


_register_welore()
