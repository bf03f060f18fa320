"""Registration of FLoRA's `optim=` names: `flora_adafactor`, `flora_adamw` and their `_layerwise` variants.

All of them accumulate gradients compressed by default: the plain names through their `*Accumulating` classes
(`hooked_cls`, driven by the layer-wise hooks) when the Trainer accumulates gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ...configs import MultiTensorConfig, find_config, parse_optim_args
from ...errors import UnsupportedSetupError
from ...registry import OptimizerSpec, get_spec, register_optimizer
from .config import FloraAccumulationConfig, FloraAdafactorConfig, FloraConfig
from .optimizer import (
    FloraAdafactor,
    FloraAdafactorAccumulating,
    FloraAdafactorLayerwise,
    FloraAdamW,
    FloraAdamWAccumulating,
    FloraAdamWLayerwise,
)


def _register_flora() -> None:
    """`flora_adafactor`, `flora_adamw` (+ `_layerwise`); all of them accumulate gradients compressed by default."""
    entries = [
        ("flora_adafactor", FloraAdafactor, FloraAdafactorAccumulating,
         "FLoRA: Adafactor with momentum compressed by seeded projections; gradient accumulation compressed."),
        ("flora_adamw", FloraAdamW, FloraAdamWAccumulating,
         "FLoRA: compressed momentum, factored second moment, AdamW lr; gradient accumulation compressed."),
        ("flora_adafactor_layerwise", FloraAdafactorLayerwise, None,
         "flora_adafactor in backward hooks; gradient accumulation compressed to m×r."),
        ("flora_adamw_layerwise", FloraAdamWLayerwise, None,
         "flora_adamw in backward hooks; gradient accumulation compressed to m×r."),
    ]  # fmt: skip
    for name, cls, accumulating, summary in entries:
        adafactor = "adafactor" in name
        configs = (FloraConfig, FloraAdafactorConfig) if adafactor else (FloraConfig, MultiTensorConfig)
        register_optimizer(
            OptimizerSpec(
                name=name,
                method="FLoRA",
                optimizer_cls=cls,
                config_classes=(*configs, FloraAccumulationConfig),
                layerwise=accumulating is None,
                adam_style=not adafactor,
                summary=summary,
                check_setup=_flora_accumulation_check(name, accumulating is None),
                hooked_cls=None if accumulating is None else _flora_hooked_cls(name, accumulating),
            )
        )


def _flora_accumulation(name: str, args: Any, configs: Sequence[Any] | None = None) -> str:
    """The `accumulation` key for the FLoRA name `name`: from the parsed `configs` (the Trainer's plan), else parsed
    from `args.optim_args` (validated)."""
    if configs is None:
        configs = parse_optim_args(args.optim_args, get_spec(name).config_classes, name)
    accumulation = find_config(configs, FloraAccumulationConfig)
    return accumulation.accumulation


def _compresses_accumulation(name: str, args: Any, configs: Sequence[Any] | None = None) -> bool:
    """Whether a plain FLoRA name accumulates compressed: gradient accumulation is on and not `accumulation=full`."""
    accumulates = getattr(args, "gradient_accumulation_steps", 1) > 1
    return accumulates and _flora_accumulation(name, args, configs) == "compressed"


def _flora_hooked_cls(name: str, accumulating: type) -> Callable[..., type | None]:
    """`hooked_cls` of a plain FLoRA name: its `*Accumulating` class when it accumulates compressed."""

    def hooked_cls(args: Any, configs: Sequence[Any] | None = None) -> type | None:
        return accumulating if _compresses_accumulation(name, args, configs) else None

    return hooked_cls


def _flora_accumulation_check(name: str, layerwise: bool) -> Callable[..., None]:
    """`check_setup` of a FLoRA name: `accumulation=full` only for the plain names. (What compressed accumulation
    cannot run under, fp16 loss scaling and `nn.DataParallel`, is refused for every hook-driven optimizer by
    `check_supported_setup`.)"""

    def check(args: Any, configs: Sequence[Any] | None = None) -> None:
        if layerwise and _flora_accumulation(name, args, configs) == "full":
            raise UnsupportedSetupError(
                f"optim={name!r} always accumulates compressed; accumulation=full is for the non-layer-wise "
                f"optim={name.removesuffix('_layerwise')!r}. Remove the key."
            )

    return check


_register_flora()
