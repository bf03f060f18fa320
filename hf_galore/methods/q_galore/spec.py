"""Registration of Q-GaLore's `optim=` names (`q_galore_adamw_8bit`, `_layerwise`): the INT8 surgery as the model
transform, the INT8 carriers as the projected group, and the setups Q-GaLore refuses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from ...configs import Blockwise8bitConfig, MultiTensorConfig, find_config
from ...errors import NoTargetModulesError, UnsupportedSetupError
from ...registry import OptimizerSpec, optim_name, register_optimizer
from ...targeting import TargetSpec, group_parameters
from ..galore.config import GaLoreConfig
from .config import QGaLoreConfig
from .optimizer import QGaLoreAdamW8bit, QGaLoreAdamW8bitLayerwise
from .transform import int8_targets, quantize_model

logger = logging.getLogger(__name__)


def prepare_model(model: nn.Module, target_modules: TargetSpec | None, configs: Sequence[Any]) -> None:
    """Registry hook of the `q_galore_*` optimizers: [`quantize_model`] with the parsed [`QGaLoreConfig`]."""
    q = find_config(configs, QGaLoreConfig, QGaLoreConfig())
    quantize_model(model, target_modules, q.weight_bits, q.weight_group_size)


def build_groups(
    model: nn.Module,
    target_modules: TargetSpec | None,
    weight_decay: float,
    no_decay_names: set[str] | None = None,
    description: str = "hf_galore",
    configs: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Param groups: the targeted INT8 weights' carriers (projected), then plain decay / no-decay parameters.

    Every trainable parameter is included (embeddings, norms, biases, heads): the carriers replace the Linear weights
    that the Trainer's default groups would otherwise have held.
    """
    int8 = int8_targets(model, target_modules)
    if not int8:
        raise NoTargetModulesError(
            f"{description}: optim_target_modules={target_modules!r} selects no INT8 Linear after the model surgery. "
            'Pass e.g. optim_target_modules="all-linear" or a list of Linear module names.'
        )
    carriers = [m.grad_carrier for _, m in int8 if m.grad_carrier.requires_grad]
    logger.info("%s: %d INT8 weights projected (%s)", description, len(carriers), ", ".join(n for n, _ in int8))
    return group_parameters(model, carriers, weight_decay, (no_decay_names or set()).__contains__)


def _world_size(args: Any) -> int:
    try:
        return int(args.world_size)
    except Exception:  # noqa: BLE001 - the property may need a distributed state; treat as one process
        return 1


def check_setup(args: Any, configs: Sequence[Any] | None = None) -> None:
    """Reject `TrainingArguments` that Q-GaLore does not support yet (before anything is built); `configs` (the
    parsed `optim_args`) are not needed.

    Under DDP only the layer-wise name runs: its carriers leave DDP's reducer (the hooks all-reduce their projected
    gradients, or the full ones on refresh steps) and every rank requantizes with the same seeded stochastic rounding,
    so the INT8 replicas stay identical. The plain name would leave the carriers to DDP, whose wrap-time broadcast of
    the parameters writes into every element of a tensor and fails on a carrier (one element seen as m×n)."""
    name = optim_name(args.optim)
    world_size = _world_size(args)
    if world_size > 1 and name == "q_galore_adamw_8bit":
        raise UnsupportedSetupError(
            f"optim={name!r} does not support yet: {world_size} processes. DDP cannot wrap its INT8 gradient "
            "carriers (one-element parameters that only receive the weight gradient; DDP's initial broadcast "
            "writes into every element of each parameter). Use optim='q_galore_adamw_8bit_layerwise' for "
            "multi-process (DDP) runs: the same optimizer and checkpoint format, with the carriers' gradients "
            "reduced by the optimizer itself (gradient accumulation and max_grad_norm work); or train on one process."
        )


def _register_q_galore() -> None:
    """`q_galore_adamw_8bit` (+ `_layerwise`): target Linears become INT8 (model preparation), then Q-GaLore."""
    q_galore = dict(
        method="Q-GaLore",
        config_classes=(GaLoreConfig, Blockwise8bitConfig, QGaLoreConfig, MultiTensorConfig),
        needs_bitsandbytes=True,
        prepare_model=prepare_model,
        build_groups=build_groups,
        check_setup=check_setup,
    )
    register_optimizer(
        OptimizerSpec(
            name="q_galore_adamw_8bit",
            optimizer_cls=QGaLoreAdamW8bit,
            summary="Q-GaLore: INT8 target weights (stochastic rounding), INT4 bases, lazy refresh, 8-bit states.",
            **q_galore,
        )
    )
    register_optimizer(
        OptimizerSpec(
            name="q_galore_adamw_8bit_layerwise",
            optimizer_cls=QGaLoreAdamW8bitLayerwise,
            summary="q_galore_adamw_8bit, each weight updated in its backward hook and its gradient freed.",
            layerwise=True,
            **q_galore,
        )
    )


_register_q_galore()
