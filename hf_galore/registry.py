"""The optimizer registry: one [`OptimizerSpec`] per `optim=` name.

A leaf: it imports no method and no optimizer. Each method registers its names from its own
`hf_galore/methods/<method>/spec.py` (imported by `hf_galore.methods`), so the registry is empty until that package
is imported; `import hf_galore` imports it. See `docs/contributing.md`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import UnknownOptimizerError
from .utils.deprecation import moved_attributes

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
        check_setup: Optional `check_setup(args, configs=None)` raising [`UnsupportedSetupError`] for
            TrainingArguments the method does not support yet; runs before anything else. `configs` are the parsed
            `optim_args`: the Trainer integration passes its [`OptimizerPlan`]'s, so nothing parses them twice;
            a hook called with None parses `args.optim_args` itself.
        hooked_cls: Optional `hooked_cls(args, configs=None)` returning a class to build instead of `optimizer_cls`
            for these TrainingArguments, driven by the layer-wise hooks (a `LayerwiseMixin` subclass, connected to the
            Trainer like the layer-wise names), or None (FLoRA's compressed gradient accumulation for the plain
            names). `configs` as for `check_setup`.
        ddp_ignored: Optional `ddp_ignored(model, groups)` returning the names (as `named_parameters()` and
            `named_buffers()` give them) of parameters and buffers DDP must not wrap or broadcast, because the
            optimizer keeps them in sync across processes itself. With several processes the Trainer integration adds
            them to the model's `_ddp_params_and_buffers_to_ignore` before the wrap, and passes a name that is not
            layer-wise accelerate's `sync_gradients` flag as the `sync_gradients` argument (so its optimizer class
            must take one). Q-GaLore: the INT8 weights' gradient carriers and codes, scales and zeros.
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
    check_setup: Callable[..., None] | None = None
    hooked_cls: Callable[..., type | None] | None = None
    ddp_ignored: Callable[..., list[str]] | None = None
    transformers_name: bool = False


REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add `spec` to the registry; a name can be registered once."""
    if spec.name in REGISTRY:
        raise ValueError(f"An optimizer named {spec.name!r} is already registered.")
    # Hooks written for the one-argument form `hook(args)` keep working: the Trainer integration passes the parsed
    # configs as a second argument.
    spec = dataclasses.replace(
        spec, check_setup=_accepting_configs(spec.check_setup), hooked_cls=_accepting_configs(spec.hooked_cls)
    )
    REGISTRY[spec.name] = spec
    if isinstance(getattr(spec.optimizer_cls, "optim_names", None), tuple):  # named in state-signature errors
        spec.optimizer_cls.optim_names = (*spec.optimizer_cls.optim_names, spec.name)
    return spec


def optim_name(value: Any) -> str:
    """The name of an `optim=` value, which is a `transformers.training_args.OptimizerNames` member or a plain string.

    Example:
        ```python
        >>> optim_name(OptimizerNames.GALORE_ADAMW), optim_name("flora_adamw")
        ('galore_adamw', 'flora_adamw')
        ```
    """
    return str(getattr(value, "value", value))


def _accepting_configs(hook: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """`hook` callable as `hook(args, configs)`: a one-argument hook (`hook(args)`) is wrapped to drop `configs`."""
    if hook is None:
        return None
    try:
        parameters = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the documented two-argument form
        return hook
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return hook

    @functools.wraps(hook)
    def two_argument_hook(args: Any, configs: Any = None) -> Any:
        return hook(args)

    return two_argument_hook


def row_sharding_names() -> list[str]:
    """The registered names whose optimizer steps on FSDP2's row-sharded (DTensor) parameters: those whose class
    declares `supports_row_sharding` (read from the class, so a method that gains the support is listed without an
    edit here). A name can still build another class for some settings (`hooked_cls`, e.g. FLoRA's accumulating
    one), which may refuse them."""
    return [name for name, spec in REGISTRY.items() if getattr(spec.optimizer_cls, "supports_row_sharding", False)]


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered as `name`.

    Raises:
        [`UnknownOptimizerError`]: listing our names and the closest match.
    """
    key = optim_name(name)
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


# Deprecated: parameter grouping moved to `hf_galore.targeting`, optimizer building to `hf_galore.builder`.
__getattr__ = moved_attributes(
    __name__,
    {
        "group_parameters": "hf_galore.targeting",
        "build_param_groups": "hf_galore.targeting",
        "optimizer_settings": "hf_galore.builder",
        "make_optimizer_kwargs": "hf_galore.builder",
    },
)
