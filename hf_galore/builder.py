"""Build a registered optimizer for a model: validate its settings, run the method's model transform, group the
parameters.

The order is the point: every check that can refuse the run ([`optimizer_settings`]) runs before the method's model
transform touches the user's model. Imports the registry and the layers below it, never a method (a method's hooks
arrive through its [`OptimizerSpec`]).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .configs import parse_optim_args
from .errors import InvalidConfigError
from .registry import OptimizerSpec, get_spec
from .targeting import TargetSpec, build_param_groups
from .utils.imports import require_bitsandbytes


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
