"""The optimizer registry: one [`OptimizerSpec`] per `optim=` name, and the param groups built for it.

Adding an optimizer is: a config dataclass (`configs.py`), a thin optimizer subclass (`optim/`), one
[`register_optimizer`] call here, tests, and a docs page. Nothing in this module imports transformers.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .configs import AdafactorConfig, Blockwise8bitConfig, GaLoreConfig, MultiTensorConfig, parse_optim_args
from .errors import InvalidConfigError, UnknownOptimizerError, UnsupportedSetupError
from .optim import (
    GaLoreAdafactor,
    GaLoreAdafactorLayerwise,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
)
from .targeting import TargetSpec, log_resolution, resolve_target_modules
from .utils.imports import require_bitsandbytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything needed to build one registered optimizer.

    Attributes:
        name: The `optim=` name.
        method: The method family shown in `hf-galore list` (e.g. `"GaLore"`).
        optimizer_cls: The `torch.optim.Optimizer` subclass.
        config_classes: Dataclasses whose fields are the valid `optim_args` keys.
        layerwise: Whether it updates parameters inside backward hooks.
        adam_style: Whether it takes `betas`/`eps` from the Trainer's `adam_beta1/2` and `adam_epsilon`.
        needs_bitsandbytes: Whether it needs the `bnb` extra.
        summary: One line for `hf-galore list`.
        prepare_model: Optional in-place model surgery run before the param groups are built, i.e. before the
            optimizer exists and before any DDP wrap (e.g. swapping Linears for quantized or factorized ones).
            Called as `prepare_model(model, target_modules, configs)` with the parsed config instances.
        build_groups: Optional replacement of [`build_param_groups`], called with the same keyword arguments plus
            `configs`; for methods whose trainable set is not "projected Linears + the rest".
        check_setup: Optional `check_setup(args)` raising [`UnsupportedSetupError`] for TrainingArguments the
            method does not support yet; runs before anything else.
        hooked_cls: Optional `hooked_cls(args)` returning a class to build instead of `optimizer_cls` for these
            TrainingArguments, driven by the layer-wise hooks (a `LayerwiseMixin` subclass, connected to the Trainer
            like the layer-wise names), or None (FLoRA's compressed gradient accumulation for the plain names).
        transformers_name: Whether transformers defines this name itself (its built-in `galore_*` names). Where
            transformers' behaviour is observable it is followed: `"all-linear"` includes the output head, and
            `Trainer.get_learning_rates()` shows transformers' grouping (see `integrations/transformers.py`).
    """

    name: str
    method: str
    optimizer_cls: type
    config_classes: tuple[type, ...]
    layerwise: bool = False
    adam_style: bool = True
    needs_bitsandbytes: bool = False
    summary: str = ""
    prepare_model: Callable[..., None] | None = None
    build_groups: Callable[..., list[dict[str, Any]]] | None = None
    check_setup: Callable[[Any], None] | None = None
    hooked_cls: Callable[[Any], type | None] | None = None
    transformers_name: bool = False


REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add `spec` to the registry; a name can be registered once."""
    if spec.name in REGISTRY:
        raise ValueError(f"An optimizer named {spec.name!r} is already registered.")
    REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered as `name`.

    Raises:
        [`UnknownOptimizerError`]: listing our names and the closest match.
    """
    key = str(getattr(name, "value", name))
    if key in REGISTRY:
        return REGISTRY[key]
    raise UnknownOptimizerError(unknown_name_message(key, list(REGISTRY)))


def unknown_name_message(name: str, ours: list[str], others: Iterable[str] = ()) -> str:
    """Error text for an unknown `optim=` name: our names, the closest match, then the rest."""
    others = [o for o in others if o not in ours]
    close = difflib.get_close_matches(name, ours + others, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    rest = f" transformers' own choices: {', '.join(others)}." if others else ""
    return (
        f"optim={name!r} is not a known optimizer.{hint} hf_galore provides: {', '.join(ours)}.{rest} "
        "Make sure `import hf_galore` runs before TrainingArguments is built."
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


def _register_welore() -> None:
    """`welore_adamw` / `welore_adamw_8bit`: the WeLore LRC/N-LRC split as model preparation, then plain AdamW (our
    GaLore optimizers with no low-rank group are exactly AdamW / 8-bit AdamW) over what the split leaves trainable.
    """
    from .configs import WeLoreConfig
    from .welore import registry_build_groups, registry_prepare_model

    welore = dict(method="WeLore", prepare_model=registry_prepare_model, build_groups=registry_build_groups)
    register_optimizer(
        OptimizerSpec(
            name="welore_adamw",
            optimizer_cls=GaLoreAdamW,
            config_classes=(WeLoreConfig,),
            summary="WeLore: compress to low-rank factors (LRC) and train only them, with fp32 AdamW states.",
            **welore,
        )
    )
    register_optimizer(
        OptimizerSpec(
            name="welore_adamw_8bit",
            optimizer_cls=GaLoreAdamW8bit,
            config_classes=(WeLoreConfig, Blockwise8bitConfig),
            summary="WeLore: compress to low-rank factors (LRC) and train only them, with 8-bit AdamW states.",
            needs_bitsandbytes=True,
            **welore,
        )
    )


_register_welore()


def _register_q_galore() -> None:
    """`q_galore_adamw_8bit` (+ `_layerwise`): target Linears become INT8 (model preparation), then Q-GaLore."""
    from .configs import QGaLoreConfig
    from .optim.q_galore import QGaLoreAdamW8bit, QGaLoreAdamW8bitLayerwise
    from .q_galore import build_groups, check_setup, prepare_model

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


def _register_flora() -> None:
    """`flora_adafactor`, `flora_adamw` (+ `_layerwise`); all of them accumulate gradients compressed by default."""
    from .configs import FloraAccumulationConfig, FloraAdafactorConfig, FloraConfig
    from .optim.flora import (
        FloraAdafactor,
        FloraAdafactorAccumulating,
        FloraAdafactorLayerwise,
        FloraAdamW,
        FloraAdamWAccumulating,
        FloraAdamWLayerwise,
    )

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


def _flora_accumulation(name: str, args: Any) -> str:
    """The `accumulation` key of `args.optim_args` for the FLoRA name `name` (validated)."""
    from .configs import FloraAccumulationConfig

    configs = parse_optim_args(args.optim_args, get_spec(name).config_classes, name)
    (accumulation,) = [c for c in configs if isinstance(c, FloraAccumulationConfig)]
    return accumulation.accumulation


def _compresses_accumulation(name: str, args: Any) -> bool:
    """Whether a plain FLoRA name accumulates compressed: gradient accumulation is on and not `accumulation=full`."""
    return getattr(args, "gradient_accumulation_steps", 1) > 1 and _flora_accumulation(name, args) == "compressed"


def _flora_hooked_cls(name: str, accumulating: type) -> Callable[[Any], type | None]:
    """`hooked_cls` of a plain FLoRA name: its `*Accumulating` class when it accumulates compressed."""

    def hooked_cls(args: Any) -> type | None:
        return accumulating if _compresses_accumulation(name, args) else None

    return hooked_cls


def _flora_accumulation_check(name: str, layerwise: bool) -> Callable[[Any], None]:
    """`check_setup` of a FLoRA name: `accumulation=full` only for the plain names. (What compressed accumulation
    cannot run under, fp16 loss scaling and `nn.DataParallel`, is refused for every hook-driven optimizer by
    `check_supported_setup`.)"""

    def check(args: Any) -> None:
        if layerwise and _flora_accumulation(name, args) == "full":
            raise UnsupportedSetupError(
                f"optim={name!r} always accumulates compressed; accumulation=full is for the non-layer-wise "
                f"optim={name.removesuffix('_layerwise')!r}. Remove the key."
            )

    return check


_register_flora()


def group_parameters(
    model: nn.Module,
    projected: list[nn.Parameter],
    weight_decay: float,
    is_no_decay: Callable[[str], bool],
    low_rank_overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """`[projected (low_rank=True), plain decay, plain no-decay]` over the trainable parameters of `model`.

    Projected parameters get `weight_decay`; every other `requires_grad` parameter gets it unless `is_no_decay(name)`.
    Empty groups are dropped. Shared by every method's group builder.
    """
    projected_ids = {id(p) for p in projected}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in projected_ids:
            continue
        (no_decay if is_no_decay(name) else decay).append(param)
    groups = [
        {"params": list(projected), "weight_decay": weight_decay, "low_rank": True, **(low_rank_overrides or {})},
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_param_groups(
    model: nn.Module,
    target_modules: TargetSpec | None,
    weight_decay: float,
    no_decay_names: set[str] | None = None,
    low_rank_overrides: dict[str, Any] | None = None,
    description: str = "hf_galore",
    include_heads: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for a GaLore-family optimizer: projected weights, then plain decay / no-decay parameters.

    Only `requires_grad` parameters are included. Projected weights get `weight_decay`; the others get it unless
    their name is in `no_decay_names` (biases and norms, as the Trainer decides). Empty groups are dropped.
    `include_heads` makes `"all-linear"` select the output head too (transformers' rule for its `galore_*` names).
    """
    resolution = resolve_target_modules(model, target_modules, include_heads=include_heads)
    log_resolution(resolution, description)
    no_decay_names = no_decay_names if no_decay_names is not None else set()
    return group_parameters(model, resolution.weights(), weight_decay, no_decay_names.__contains__, low_rank_overrides)


def optimizer_settings(
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    optim_args: str | dict[str, Any] | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
) -> tuple[OptimizerSpec, list[Any], dict[str, Any]]:
    """`(spec, parsed configs, constructor kwargs without "params")` for `name`, every setting validated.

    Runs every check on the optimizer's settings without touching a model, so callers run it before any model
    surgery: the bitsandbytes requirement, `optim_args` parsing and ranges, the learning rate, and the optimizer
    class' own constructor checks (e.g. a GaLore-only key given to Q-GaLore or FLoRA), by constructing it once on a
    one-element placeholder parameter that is then dropped.

    Raises:
        [`UnknownOptimizerError`], [`InvalidConfigError`], [`MissingDependencyError`].
    """
    spec = get_spec(name)
    if spec.needs_bitsandbytes:
        require_bitsandbytes(f"optim={spec.name!r}")
    configs = parse_optim_args(optim_args, spec.config_classes, spec.name)
    kwargs: dict[str, Any] = {"lr": lr}
    for config in configs:
        if getattr(config, "optimizer_kwargs", True):  # False for model-surgery configs (WeLoreConfig)
            kwargs.update(config.to_dict())
    if spec.adam_style:
        if betas is not None:
            kwargs["betas"] = tuple(betas)
        if eps is not None:
            kwargs["eps"] = eps
    if lr is None or lr < 0:
        raise InvalidConfigError(f"learning_rate must be ≥ 0, got {lr}.")
    _check_constructor(spec.optimizer_cls, kwargs, weight_decay)
    return spec, configs, kwargs


def _check_constructor(optimizer_cls: type, kwargs: dict[str, Any], weight_decay: float) -> None:
    """Construct `optimizer_cls` with `kwargs` on a placeholder parameter, for its checks only (then dropped).

    A layer-wise class gets the placeholder as a DDP-reduced parameter, so it hangs no hook on it and never
    broadcasts it.
    """
    import torch

    from .optim.layerwise import LayerwiseMixin

    placeholder = torch.zeros(1, requires_grad=True)
    extra = {"ddp_params": [placeholder]} if issubclass(optimizer_cls, LayerwiseMixin) else {}
    optimizer_cls([{"params": [placeholder], "weight_decay": weight_decay}], **kwargs, **extra)


def make_optimizer_kwargs(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    target_modules: TargetSpec | None,
    optim_args: str | dict[str, Any] | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    no_decay_names: set[str] | None = None,
) -> tuple[type, dict[str, Any]]:
    """`(optimizer class, constructor kwargs including "params")` for the registered optimizer `name`.

    The settings are validated by [`optimizer_settings`] before the method's model surgery (if any) runs.

    Raises:
        [`UnknownOptimizerError`], [`InvalidConfigError`], [`NoTargetModulesError`], [`MissingDependencyError`].
    """
    spec, configs, kwargs = optimizer_settings(
        name, lr=lr, weight_decay=weight_decay, optim_args=optim_args, betas=betas, eps=eps
    )
    if spec.prepare_model is not None:
        spec.prepare_model(model, target_modules, configs)
    group_kwargs = dict(
        model=model,
        target_modules=target_modules,
        weight_decay=weight_decay,
        no_decay_names=no_decay_names,
        description=f"optim={spec.name!r}",
    )
    if spec.build_groups is not None:
        kwargs["params"] = spec.build_groups(**group_kwargs, configs=configs)
    else:
        kwargs["params"] = build_param_groups(**group_kwargs, include_heads=spec.transformers_name)
    return spec.optimizer_cls, kwargs
