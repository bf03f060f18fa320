"""Registration of Q-GaLore's `optim=` names (`q_galore_adamw_8bit`, `_layerwise`): the INT8 surgery as the model
transform, the INT8 carriers as the projected group, what DDP must leave alone, and the setups Q-GaLore refuses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ...configs import Blockwise8bitConfig, MultiTensorConfig, find_config
from ...errors import NoTargetModulesError, UnsupportedSetupError
from ...modules.int8_linear import Int8Linear
from ...registry import OptimizerSpec, optim_name, register_optimizer
from ...targeting import TargetSpec, group_parameters
from ..galore.config import GaLoreConfig
from .config import QGaLoreConfig
from .optimizer import WEIGHT_KEYS, QGaLoreAdamW8bit, QGaLoreAdamW8bitLayerwise
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


def ddp_ignored(model: nn.Module, groups: list[dict[str, Any]]) -> list[str]:
    """Names of what DDP must leave alone: every trained INT8 weight's gradient carrier and its buffers.

    DDP cannot wrap a carrier (its wrap-time broadcast writes into every element of a parameter; a carrier is one
    element seen as m×n), so the optimizer averages the carriers' gradients itself (see `QGaLoreAdamW8bit`). The
    codes, scales and zeros are left out too: every process applies the same update with the same seeded rounding,
    so they stay identical, and DDP's default `broadcast_buffers=True` would otherwise send every INT8 weight from
    rank 0 before each forward pass (m·n bytes per weight and micro-step, for no change).
    """
    trained = {id(p) for group in groups for p in group["params"]}
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear) and id(module.grad_carrier) in trained:
            prefix = f"{name}." if name else ""
            names += [prefix + "grad_carrier", *(prefix + buffer for buffer in WEIGHT_KEYS.values())]
    return names


def _fsdp_requested(args: Any) -> bool:
    # accelerate passes an FSDP launch config to the processes through the environment, not TrainingArguments.
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return launched or bool(getattr(args, "fsdp", None))


def check_setup(args: Any, configs: Sequence[Any] | None = None) -> None:
    """Reject `TrainingArguments` that Q-GaLore does not support (before anything is built); `configs` (the parsed
    `optim_args`) are not needed.

    Both names run under DDP (see [`ddp_ignored`]). FSDP is refused with Q-GaLore's own reason, ahead of the
    generic FSDP refusal of every name: the INT8 weights are buffers, which FSDP2's `fully_shard` does not shard.
    """
    name = optim_name(args.optim)
    if _fsdp_requested(args):
        raise UnsupportedSetupError(
            f"optim={name!r} cannot run under FSDP: Q-GaLore keeps each target weight as INT8 codes, scales and "
            "zeros in buffers, which FSDP2's fully_shard does not shard (every process would hold every INT8 weight "
            "whole), and its weight gradients arrive in one-element carrier parameters that FSDP cannot shard "
            "either. Use DDP (`accelerate launch --num_processes N` without an FSDP config) with "
            "optim='q_galore_adamw_8bit' or 'q_galore_adamw_8bit_layerwise', or, to shard, optim='galore_adamw_8bit', "
            "whose optimizer steps on FSDP2 fully_shard parameters (the Trainer with fsdp_config={'fsdp_version': 2}, "
            "or your own training loop: docs/how_to/fsdp2.md)."
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
        ddp_ignored=ddp_ignored,
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
