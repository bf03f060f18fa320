"""Build a registered optimizer for a model: validate its settings, run the method's model transform, group the
parameters.

The order is the point: every check that can refuse the run ([`plan_optimizer`]) runs before the method's model
transform touches the user's model. `optim_args` are parsed once, into an [`OptimizerPlan`] that the setup checks,
the model surgery and the grouping all read. Imports the registry and the layers below it, never a method (a method's
hooks arrive through its [`OptimizerSpec`]).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .configs import find_config, optimizer_kwargs, parse_optim_args
from .errors import InvalidConfigError
from .registry import OptimizerSpec, get_spec
from .targeting import TargetSpec, build_param_groups
from .utils.imports import require_bitsandbytes


@dataclass
class OptimizerPlan:
    """One `optim=` choice resolved and validated once: what the checks, the model surgery and the grouping read.

    Built by [`plan_optimizer`] (every check on the settings has passed by then); the Trainer integration builds one
    per Trainer and hands the same object to the setup checks, the surgery and the optimizer handler.

    Attributes:
        spec ([`OptimizerSpec`]): The registered optimizer.
        configs (`tuple`): The parsed `optim_args`, one instance of each of `spec.config_classes`, in that order.
        kwargs (`dict`): Constructor kwargs of `spec.optimizer_cls`, without `"params"`.
        target_modules (`str` or `list[str]`, *optional*): The modules to project / transform.
        weight_decay (`float`): The weight decay of the decayed param groups.
    """

    spec: OptimizerSpec
    configs: tuple[Any, ...]
    kwargs: dict[str, Any]
    target_modules: TargetSpec | None = None
    weight_decay: float = 0.0
    #: Models the method's surgery already ran on with this plan (weak: a plan never keeps a model alive).
    prepared: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def config(self, config_cls: type) -> Any:
        """The parsed instance of `config_cls` (or of a subclass), or None when this optimizer does not take it."""
        return find_config(self.configs, config_cls)


def plan_optimizer(
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    optim_args: str | dict[str, Any] | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    target_modules: TargetSpec | None = None,
) -> OptimizerPlan:
    """Resolve `name` and its settings into an [`OptimizerPlan`], every setting validated, no model touched.

    Runs every check on the optimizer's settings, so callers run it before any model surgery: the bitsandbytes
    requirement, `optim_args` parsing and ranges, the learning rate, and the optimizer class' own constructor checks
    (e.g. a GaLore-only key given to Q-GaLore or FLoRA), by constructing it once on a one-element placeholder
    parameter that is then dropped.

    Raises:
        [`UnknownOptimizerError`], [`InvalidConfigError`], [`MissingDependencyError`].
    """
    spec = get_spec(name)
    if spec.needs_bitsandbytes:
        require_bitsandbytes(f"optim={spec.name!r}")
    configs = parse_optim_args(optim_args, spec.config_classes, spec.name)
    kwargs: dict[str, Any] = {"lr": lr, **optimizer_kwargs(configs)}
    if spec.adam_style:
        if betas is not None:
            kwargs["betas"] = tuple(betas)
        if eps is not None:
            kwargs["eps"] = eps
    if lr is None or lr < 0:
        raise InvalidConfigError(f"learning_rate must be ≥ 0, got {lr}.")
    _check_constructor(spec.optimizer_cls, kwargs, weight_decay)
    return OptimizerPlan(spec, tuple(configs), kwargs, target_modules, weight_decay)


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

    The tuple form of [`plan_optimizer`] (which see), touching no model.

    Raises:
        [`UnknownOptimizerError`], [`InvalidConfigError`], [`MissingDependencyError`].
    """
    plan = plan_optimizer(name, lr=lr, weight_decay=weight_decay, optim_args=optim_args, betas=betas, eps=eps)
    return plan.spec, list(plan.configs), dict(plan.kwargs)


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


def prepare_model(plan: OptimizerPlan, model: nn.Module) -> None:
    """Run the method's model surgery of `plan` on `model`, once: a model this plan already prepared is left alone.

    Call it only after every check that can refuse the run (building `plan` ran the settings' checks; the Trainer
    integration also runs its setup checks first), so a refused run never leaves the model converted. The methods'
    transforms are idempotent too (they skip what is already converted), so a model prepared by another plan or by
    a `WeLoreCallback` is not converted twice either.
    """
    if plan.spec.prepare_model is None or model in plan.prepared:
        return
    plan.spec.prepare_model(model, plan.target_modules, list(plan.configs))
    plan.prepared.add(model)


def optimizer_kwargs_from_plan(
    plan: OptimizerPlan, model: nn.Module, *, no_decay_names: set[str] | None = None
) -> tuple[type, dict[str, Any]]:
    """`(optimizer class, constructor kwargs including "params")` for `plan` on `model`.

    Runs the model surgery if this plan has not run it on `model` yet ([`prepare_model`]), then builds the param
    groups (the method's `build_groups`, or [`build_param_groups`]).

    Raises:
        [`NoTargetModulesError`].
    """
    prepare_model(plan, model)
    spec = plan.spec
    group_kwargs = dict(
        model=model,
        target_modules=plan.target_modules,
        weight_decay=plan.weight_decay,
        no_decay_names=no_decay_names,
        description=f"optim={spec.name!r}",
    )
    kwargs = dict(plan.kwargs)
    if spec.build_groups is not None:
        kwargs["params"] = spec.build_groups(**group_kwargs, configs=list(plan.configs))
    else:
        kwargs["params"] = build_param_groups(**group_kwargs, include_heads=spec.transformers_name)
    return spec.optimizer_cls, kwargs


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

    [`plan_optimizer`] then [`optimizer_kwargs_from_plan`]: the settings are validated before the method's model
    surgery (if any) runs; the surgery is idempotent, so a model already prepared is not converted again.

    Raises:
        [`UnknownOptimizerError`], [`InvalidConfigError`], [`NoTargetModulesError`], [`MissingDependencyError`].
    """
    plan = plan_optimizer(
        name,
        lr=lr,
        weight_decay=weight_decay,
        optim_args=optim_args,
        betas=betas,
        eps=eps,
        target_modules=target_modules,
    )
    return optimizer_kwargs_from_plan(plan, model, no_decay_names=no_decay_names)
