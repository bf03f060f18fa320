"""Registration of hf_galore's optimizers as `optim=` choices of the stock `TrainingArguments` / `Trainer`.

transformers has no public extension point for `optim=` names (`OptimizerNames` is a closed Enum validated in
`TrainingArguments.__post_init__`), so [`register`] does these reversible things, feature-detected rather than keyed
on version strings:

1. adds our names to `transformers.training_args.OptimizerNames` (the built-in `galore_*` members are reused);
2. routes the Trainer to our handlers: in transformers ≥ 5.2 through the `_OPTIMIZER_HANDLERS` table (mutated in
   place, the Trainer holds a reference to it), on older versions by wrapping `Trainer.get_optimizer_cls_and_kwargs`;
3. makes an unknown `optim=` name fail with our names and the closest match;
4. wraps `Trainer.create_optimizer` to assert the optimizer built for one of our names is ours (never a silent
   fallback to AdamW), and `Trainer.__init__` to run every check that can refuse the run ([`check_before_training`])
   and then a method's model surgery (WeLore split, Q-GaLore INT8 Linears) before a checkpoint can be loaded into
   the model. `optim_args` are parsed once per Trainer: the checks, the surgery, `WeLoreCallback` and the optimizer
   handler share one [`OptimizerPlan`] kept on the Trainer (see `integrations/plans.py`);
5. wraps `Trainer.get_learning_rates` so that transformers' own `galore_*` names show transformers' grouping
   (see [`transformers_learning_rates`]);
6. wraps `Trainer._load_optimizer_and_scheduler` to check an FSDP2 checkpoint's sharded optimizer state against our
   optimizer before accelerate loads it (see [`check_fsdp2_optimizer_checkpoint`]).

[`unregister`] undoes all of it exactly. [`optimizer_cls_and_kwargs`] is the no-patching path for
`Trainer(optimizer_cls_and_kwargs=...)`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from .. import methods  # noqa: F401 - registers every method's optim= names
from ..builder import OptimizerPlan, optimizer_kwargs_from_plan, prepare_model
from ..configs import split_optim_args
from ..errors import (
    HfGaloreError,
    OptimizerMismatchError,
    UnsupportedSetupError,
    UnsupportedTransformersVersionError,
)
from ..optim.layerwise import is_layerwise
from ..registry import REGISTRY, get_spec, optim_name, row_sharding_names, unknown_name_message
from ..utils.versions import supported_transformers, transformers_install_hint
from .callbacks import attach_layerwise_callbacks
from .learning_rates import transformers_learning_rates
from .plans import building, current_trainer, plan_for

logger = logging.getLogger(__name__)


class _Registration:
    """What [`register`] changed, so that [`unregister`] can put it back."""

    def __init__(self) -> None:
        self.active = False
        self.added_members: list[str] = []
        self.replaced_handlers: dict[Any, Any] = {}
        self.missing_hook: Any = None
        self.had_own_missing = False
        self.original_get_cls_and_kwargs: Any = None
        self.original_create_optimizer: Any = None
        self.original_init: Any = None
        self.original_get_learning_rates: Any = None
        self.original_load_optimizer: Any = None


_STATE = _Registration()


def _optimizer_names():
    from transformers.training_args import OptimizerNames

    return OptimizerNames


def _handler_table() -> dict | None:
    try:
        from transformers import trainer_optimizer
    except ImportError:
        return None
    return getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)


def _member_name(value: str) -> str:
    return value.upper()


def optimizer_name_from_pickle(value: str) -> Any:
    """The `OptimizerNames` member `value`, registering hf_galore first: how a pickled member we added loads.

    A pickled `TrainingArguments` (the Trainer's `training_args.bin`) holds its `optim` as an `OptimizerNames`
    member; for a name transformers does not know, the stock unpickling (`OptimizerNames("flora_adamw")`) fails
    unless `import hf_galore` ran first. Our members pickle as a call to this function instead, so loading them
    imports and registers hf_galore (or, where it is not installed, fails naming `hf_galore`).
    """
    register()
    return _optimizer_names()(value)


def _reduce_member(value: str, protocol: int) -> tuple[Any, tuple[str]]:
    return optimizer_name_from_pickle, (value,)


def _add_enum_member(enum_cls: type, value: str) -> bool:
    """Add `value` to the closed Enum `enum_cls` in place; False if it already exists."""
    if value in enum_cls._value2member_map_:
        return False
    name = _member_name(value)
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    member.__reduce_ex__ = functools.partial(_reduce_member, value)  # see optimizer_name_from_pickle
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)
    return True


def _remove_enum_member(enum_cls: type, value: str) -> None:
    name = _member_name(value)
    enum_cls._member_names_.remove(name)
    del enum_cls._member_map_[name]
    del enum_cls._value2member_map_[value]
    type.__delattr__(enum_cls, name)


def _training_args_world_size(args: Any) -> int:
    try:
        return int(args.world_size)
    except Exception:  # noqa: BLE001 - property may need a distributed state; treat as single process
        return 1


def _env_flag(name: str) -> bool:
    """accelerate passes its launch config (FSDP, DeepSpeed) to the processes through environment variables."""
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_version(args: Any) -> int | None:
    """The FSDP version (1 or 2) the Trainer will run `args` under, or None without FSDP.

    `TrainingArguments(fsdp=..., fsdp_config=...)` is turned by transformers into `args.fsdp_plugin_args`, the
    keyword arguments of accelerate's `FullyShardedDataParallelPlugin`, whose `fsdp_version` is what accelerate
    uses (transformers 5.x defaults it to 2). Without them, accelerate's launch config reaches the processes as
    `ACCELERATE_USE_FSDP` and `FSDP_VERSION`, and the plugin defaults to version 1 (FSDP1).
    """
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if isinstance(plugin_args, dict):
        return int(plugin_args.get("fsdp_version", 1))
    if getattr(args, "fsdp", None):  # arguments without the processed plugin kwargs: read the config itself
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("fsdp_version", config.get("version", 1)))
    if _env_flag("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def _check_fsdp(args: Any, name: str, spec: Any, configs: Sequence[Any] | None, version: int) -> None:
    """Accept FSDP2 for optimizers that step on its row shards; refuse FSDP1 and every other optimizer.

    Under FSDP2 the Trainer builds the optimizer on the plain parameters and accelerate swaps FSDP2's DTensor
    parameters in afterwards (the optimizer re-checks them before its first step). Refused: optimizers without
    `supports_row_sharding`, the layer-wise names and FLoRA's compressed gradient accumulation (their backward hooks
    assume replicated parameters), FSDP1, which hands the optimizer flattened 1-D shards, and checkpoints of a model
    our surgery rebuilt (WeLore) with FULL_STATE_DICT (see below). Checkpoints are otherwise fine: the optimizer state
    is saved as `Shard(0)` DTensors of the global shape.
    """
    hooked = spec.hooked_cls is not None and spec.hooked_cls(args, configs) is not None
    supported = ", ".join(repr(n) for n in row_sharding_names())
    if spec.layerwise or hooked or not getattr(spec.optimizer_cls, "supports_row_sharding", False):
        if spec.layerwise:
            reason = "it updates each weight inside backward hooks, which assume replicated parameters"
            if name.removesuffix("_layerwise") in row_sharding_names():
                reason += f" (the non-layer-wise optim={name.removesuffix('_layerwise')!r} runs under FSDP2)"
        elif hooked:
            reason = (
                f"with gradient_accumulation_steps={args.gradient_accumulation_steps} it accumulates compressed "
                "gradients in backward hooks, which assume replicated parameters (optim_args='accumulation=full' "
                "accumulates full-size gradients and is supported)"
            )
        else:
            reason = f"{spec.optimizer_cls.__name__} does not step on FSDP2's row-sharded (DTensor) parameters yet"
        raise UnsupportedSetupError(
            f"optim={name!r} cannot run under FSDP: {reason}. Under FSDP2 the Trainer supports optim={supported}; "
            "or use DDP (`accelerate launch --num_processes N`, no FSDP config)."
        )
    if version != 2:
        raise UnsupportedSetupError(
            f"optim={name!r} cannot run under FSDP{version}: it hands the optimizer flattened 1-D shards, so there are "
            f"no weight matrices to project. {_fsdp2_pointer()}"
        )
    # A model our surgery rebuilt (WeLore's factors) carries our transformers quantizer, whose state dict
    # `save_pretrained` writes in place of the one it is given (transformers 5.24 modeling_utils.py:3432-3433). Under
    # FULL_STATE_DICT the Trainer hands it the gathered weights, but only rank 0 calls `save_pretrained`
    # (trainer.py:4143-4145), so the quantizer cannot gather them itself: its `model.state_dict()` is DTensor shards
    # and the first checkpoint fails in safetensors. SHARDED_STATE_DICT saves through DCP and works.
    strategy = getattr(args, "save_strategy", "no")
    saving = str(getattr(strategy, "value", strategy)) != "no"
    if spec.prepare_model is not None and saving and _fsdp_state_dict_type(args) == "FULL_STATE_DICT":
        raise UnsupportedSetupError(
            f"optim={name!r} under FSDP2 cannot save checkpoints with state_dict_type='FULL_STATE_DICT' (accelerate's "
            "default): transformers saves the factorized model from its sharded tensors and fails. Set "
            "fsdp_config={'state_dict_type': 'SHARDED_STATE_DICT'} (accelerate config: fsdp_state_dict_type: "
            "SHARDED_STATE_DICT), which saves and resumes, or save_strategy='no'."
        )


def _fsdp_state_dict_type(args: Any) -> str:
    """The FSDP state dict type the Trainer's accelerate plugin will use: `TrainingArguments.fsdp_config`'s, else
    the accelerate launch config's (`FSDP_STATE_DICT_TYPE`), else accelerate's default, FULL_STATE_DICT."""
    plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
    value = plugin_args.get("state_dict_type") or os.environ.get("FSDP_STATE_DICT_TYPE") or "FULL_STATE_DICT"
    return "FULL_STATE_DICT" if "FULL_STATE_DICT" in str(value).upper() else str(value).upper()


def _fsdp2_pointer() -> str:
    """Where a DeepSpeed or FSDP1 refusal sends the user: FSDP2 and the names whose optimizer steps on its shards."""
    return (
        "FSDP2 (`fully_shard`) keeps each weight a matrix (row shards): use `fsdp_config={'fsdp_version': 2}` or "
        "`accelerate launch --config_file recipes/accelerate_configs/fsdp2.yaml` with an optim whose optimizer "
        f"steps on its shards ({', '.join(row_sharding_names())}; docs/how_to/fsdp2.md says which launch paths "
        "are verified), or plain DDP (`accelerate launch --num_processes N`, no FSDP/DeepSpeed config)."
    )


def check_supported_setup(args: Any, name: str, configs: Sequence[Any] | None = None) -> None:
    """Raise [`UnsupportedSetupError`] before training for combinations hf_galore does not support yet.

    `configs` are the parsed `optim_args` (an [`OptimizerPlan`]'s); without them, a method hook that needs one
    parses `args.optim_args` itself.
    """
    spec = get_spec(name)
    if spec.check_setup is not None:
        spec.check_setup(args, configs)
    if getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise UnsupportedSetupError(
            f"optim={name!r} cannot run under DeepSpeed: ZeRO hands the optimizer flattened 1-D shards, so there are "
            f"no weight matrices to project. {_fsdp2_pointer()}"
        )
    version = fsdp_version(args)
    if version is not None:
        _check_fsdp(args, name, spec, configs, version)
    # Optimizers driven by backward hooks: the layer-wise names, and a plain name whose `hooked_cls` takes over for
    # these arguments (FLoRA's compressed gradient accumulation). The hooks consume each gradient in backward.
    hooked = spec.hooked_cls is not None and spec.hooked_cls(args, configs) is not None
    if not (spec.layerwise or hooked):
        return
    problems = []
    # fp16 may come from TrainingArguments or only from the accelerate launch config (then `args.fp16` stays False).
    fp16 = getattr(args, "fp16", False) or getattr(args, "mixed_precision", None) == "fp16"
    if fp16 or os.environ.get("ACCELERATE_MIXED_PRECISION", "") == "fp16":
        problems.append("fp16=True (use bf16=True: loss scaling must unscale and inf-check every gradient first)")
    if getattr(args, "n_gpu", 1) > 1 and _training_args_world_size(args) == 1:
        problems.append(f"torch.nn.DataParallel over {args.n_gpu} GPUs (launch one process per GPU with accelerate)")
    if problems and spec.layerwise:
        base = name.removesuffix("_layerwise")
        raise UnsupportedSetupError(
            f"optim={name!r} updates each weight inside backward and does not support: {'; '.join(problems)}. "
            f"Change those settings, or use the non-layer-wise optim={base!r}, which supports them."
        )
    if problems:
        raise UnsupportedSetupError(
            f"optim={name!r} with gradient_accumulation_steps={args.gradient_accumulation_steps} accumulates "
            f"compressed gradients in backward hooks, which does not support: {'; '.join(problems)}. Change "
            "those settings, or pass optim_args='accumulation=full' to accumulate full-size gradients."
        )


def check_before_training(args: Any, name: str, trainer: Any = None) -> OptimizerPlan:
    """Run every check that can refuse `optim=name` with these `TrainingArguments`, touching no model; return the
    [`OptimizerPlan`] they validated.

    The full validation of the optimizer's settings (building the plan: bitsandbytes, every `optim_args` key and
    range, the learning rate, the optimizer's constructor checks), then [`check_supported_setup`] on the parsed
    configs (the method's own setup check, DeepSpeed/FSDP, the layer-wise limits). The `Trainer.__init__` wrapper
    runs it before any model surgery, so a refused run leaves the caller's model exactly as it was. With a
    `trainer`, the plan is kept on it for the surgery and the optimizer handler (see [`plan_for`]).
    """
    plan = plan_for(args, name, trainer)
    check_supported_setup(args, plan.name, plan.configs)
    return plan


def _layerwise_kwargs(args: Any, model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Constructor kwargs that connect a layer-wise optimizer to the Trainer's loop.

    * `sync_gradients` reads accelerate's gradient state, which the Trainer sets on every micro-step;
    * clipping moves into the optimizer (the Trainer's own pass runs after the hooks freed the gradients and would
      clip only what DDP reduced): `args.max_grad_norm` is handed over, and the wrapped `create_optimizer` gives
      the Trainer a copy of its arguments with `max_grad_norm=0` (the user's arguments are left untouched);
    * under DDP the projected weights leave DDP's reducer (the hooks all-reduce their projected gradients) and the
      other parameters stay with DDP;
    * shared (tied) weights are updated in `step()`, since their hook may fire more than once per backward.
    """
    from accelerate.state import GradientState

    max_grad_norm = args.max_grad_norm or 0.0
    gradient_state = GradientState()
    kwargs: dict[str, Any] = {
        "max_grad_norm": max_grad_norm,
        "sync_gradients": lambda: gradient_state.sync_gradients,
    }
    names_by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(param), []).append(name)
    kwargs["deferred_params"] = [p for g in groups for p in g["params"] if len(names_by_id.get(id(p), [])) > 1]
    if _training_args_world_size(args) > 1:
        own = [p for g in groups if g.get("low_rank") for p in g["params"]]
        own_ids = {id(p) for p in own}
        _keep_out_of_ddp(model, {n for p in own for n in names_by_id[id(p)]})
        kwargs["ddp_params"] = [p for g in groups for p in g["params"] if id(p) not in own_ids]
    return kwargs


def _keep_out_of_ddp(model: nn.Module, names: set[str]) -> None:
    """Add `names` (parameters and buffers) to the list DDP reads when it wraps `model`: it neither broadcasts nor
    reduces them. Set before the Trainer's wrap, which happens after the optimizer is built."""
    already = set(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = sorted(already | names)


def _connect_hand_built_layerwise(optimizer: Any, args: Any) -> None:
    """Connect a layer-wise optimizer passed through `Trainer(optimizers=...)` the way our builder would have.

    Without the accumulation flag, every micro-step's backward would update the weights (gradient accumulation
    silently off), and the Trainer's clipping, which runs after the hooks consumed the gradients, would clip nothing.
    So: read accelerate's flag, and hand `args.max_grad_norm` over when the optimizer was given none. Under DDP the
    hand-built optimizer lacks the reducer split our builder sets up, which cannot be repaired after the fact.
    """
    from accelerate.state import GradientState

    if optimizer.has_sync_source:  # built by `optimizer_cls_and_kwargs` (or connected by its author): nothing to do
        return
    world_size = _training_args_world_size(args)
    if world_size > 1:
        raise UnsupportedSetupError(
            f"A hand-built {type(optimizer).__name__} was passed to the Trainer in a {world_size}-process run. "
            "Layer-wise optimizers need DDP's reducer split at construction; build it with "
            "`cls, kwargs = hf_galore.optimizer_cls_and_kwargs(args, model)` (or just set optim= by name)."
        )
    gradient_state = GradientState()
    optimizer.set_sync_source(lambda: gradient_state.sync_gradients)
    if optimizer.max_grad_norm == 0 and (args.max_grad_norm or 0) > 0:
        optimizer.max_grad_norm = float(args.max_grad_norm)
    logger.info(
        "Hand-built %s: it now follows the Trainer's gradient accumulation and clips to max_grad_norm=%s.",
        type(optimizer).__name__,
        optimizer.max_grad_norm,
    )


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names the Trainer would exclude from weight decay (biases, norms), by the Trainer's own rule."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    return {n for n, _ in model.named_parameters() if n not in decay}


def optimizer_cls_and_kwargs(args: Any, model: nn.Module, optim: str | None = None) -> tuple[type, dict[str, Any]]:
    """`(optimizer class, kwargs)` for one of our optimizers, from `TrainingArguments` — no patching involved.

    Pass the result as `Trainer(optimizer_cls_and_kwargs=...)`. `optim` defaults to `args.optim`; give it when the
    arguments name another optimizer (e.g. when building `TrainingArguments` before `import hf_galore`).

    Example:
        ```python
        >>> args = TrainingArguments("out", optim_target_modules="all-linear", optim_args="rank=8")
        >>> trainer = Trainer(model, args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, model, "galore_adamw"))
        ```
    """
    # Inside a Trainer (its create_optimizer), the plan its __init__ built and validated, unless args changed since.
    plan = check_before_training(args, optim_name(optim if optim is not None else args.optim), current_trainer())
    optimizer_cls, kwargs = optimizer_kwargs_from_plan(plan, model, no_decay_names=_no_decay_names(model))
    spec = plan.spec
    hooked_cls = spec.hooked_cls(args, plan.configs) if spec.hooked_cls is not None else None  # FLoRA's accumulation
    if spec.layerwise or hooked_cls is not None:
        kwargs.update(_layerwise_kwargs(args, model, kwargs["params"]))
    if spec.ddp_ignored is not None and _training_args_world_size(args) > 1:
        # What the optimizer keeps in sync itself (Q-GaLore's carriers and INT8 buffers); see OptimizerSpec.
        _keep_out_of_ddp(model, set(spec.ddp_ignored(model, kwargs["params"])))
        if not (spec.layerwise or hooked_cls is not None):
            from accelerate.state import GradientState

            gradient_state = GradientState()
            kwargs["sync_gradients"] = lambda: gradient_state.sync_gradients
    return hooked_cls or optimizer_cls, kwargs


def _handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """Handler for transformers ≥ 5.2's `_OPTIMIZER_HANDLERS` table."""
    if ctx.model is None:
        raise HfGaloreError(f"optim={optim_name(ctx.args.optim)!r} needs the model to select the weights to project.")
    return optimizer_cls_and_kwargs(ctx.args, ctx.model)


def _missing(cls: type, value: Any) -> Any:
    ours = list(REGISTRY)
    raise ValueError(unknown_name_message(str(value), ours, list(cls._value2member_map_)))


def _wrap_get_cls_and_kwargs(original: Any, route: bool = True) -> Any:
    """Wrap `Trainer.get_optimizer_cls_and_kwargs`: validate our names' `optim_args` before transformers' parser
    (which fails on a malformed item with a bare `not enough values to unpack`), and with `route` (transformers
    without the handler table) build our optimizers here instead of through the table.
    """

    @functools.wraps(original)
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, Any]:
        name = optim_name(args.optim)
        if name in REGISTRY:
            split_optim_args(args.optim_args)  # raises our InvalidConfigError naming the malformed item
            if route:
                if model is None:
                    raise HfGaloreError(f"optim={name!r} needs the model to select the weights to project.")
                return optimizer_cls_and_kwargs(args, model)
        return original(args, model)

    return staticmethod(get_optimizer_cls_and_kwargs)


def prepare_model_for(args: Any, model: nn.Module | None, plan: OptimizerPlan | None = None) -> None:
    """Run the model surgery of the optimizer named by `args.optim`, if it has one, once per plan.

    Called at the end of `Trainer.__init__`, so the surgery (WeLore's split, Q-GaLore's INT8 Linears) happens before
    `train(resume_from_checkpoint=...)` loads the checkpoint's weights into the model, before the optimizer exists
    and before any DDP wrap; [`check_before_training`] ran before the stock constructor and left its plan on the
    Trainer. The optimizer handler then builds from the same plan, which records that the model is prepared.
    """
    spec = REGISTRY.get(optim_name(args.optim))
    if spec is None or spec.prepare_model is None or model is None:
        return
    prepare_model(plan if plan is not None else plan_for(args, trainer=current_trainer()), model)


def _has_welore_callback(callbacks: Any) -> bool:
    from .callbacks import WeLoreCallback

    return any(c is WeLoreCallback or isinstance(c, WeLoreCallback) for c in callbacks or ())


def _check_before_init(signature: inspect.Signature, trainer: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """The checks of [`check_before_training`] for a `Trainer(...)` call that will touch the model.

    They run before the stock constructor, because the model can be changed inside it (`WeLoreCallback` splits in
    `on_init_end`) and right after it (the method's surgery below). Only when the Trainer builds one of our
    optimizers by name and something will touch the model (a method with model surgery, or a `WeLoreCallback`);
    otherwise the same checks run when the optimizer is built, as for every optimizer.
    """
    try:
        bound = signature.bind(trainer, *args, **kwargs).arguments
    except TypeError:
        return  # the stock constructor raises its own error for a malformed call
    training_args = bound.get("args")
    if training_args is None:
        return
    name = optim_name(training_args.optim)
    spec = REGISTRY.get(name)
    optimizers = bound.get("optimizers") or (None, None)
    if spec is None or optimizers[0] is not None or bound.get("optimizer_cls_and_kwargs") is not None:
        return
    if spec.prepare_model is not None or _has_welore_callback(bound.get("callbacks")):
        check_before_training(training_args, name, trainer)  # the plan stays on the Trainer


def _wrap_init(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with building(self):  # the plan of the checks is the one the callbacks and the surgery read
            _check_before_init(signature, self, args, kwargs)
            original(self, *args, **kwargs)
            if getattr(self, "optimizer_cls_and_kwargs", None) is None and getattr(self, "optimizer", None) is None:
                prepare_model_for(self.args, self.model)

    return __init__


def _wrap_create_optimizer(original: Any) -> Any:
    @functools.wraps(original)
    def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        with building(self):  # the handler, called with (args, model) only, finds this Trainer's plan
            optimizer = original(self, *args, **kwargs)
        name = optim_name(self.args.optim)
        actual = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate / smp wrappers
        if name in REGISTRY and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            expected = REGISTRY[name].optimizer_cls
            if not isinstance(actual, expected):
                raise OptimizerMismatchError(
                    f"optim={name!r} should have built {expected.__name__}, but the Trainer built "
                    f"{type(actual).__name__}. A Trainer subclass probably overrides optimizer creation; build the "
                    "optimizer with hf_galore.optimizer_cls_and_kwargs(args, model) instead."
                )
        if is_layerwise(actual):
            _connect_hand_built_layerwise(actual, self.args)
        if is_layerwise(actual) and (self.args.max_grad_norm or 0) > 0:
            # The layer-wise optimizer clips itself (it was given max_grad_norm); the Trainer's own pass would see only
            # the gradients DDP keeps. Turn it off on a copy, so the user's TrainingArguments stay as they were.
            logger.info("Layer-wise optimizer clips to max_grad_norm=%s itself.", self.args.max_grad_norm)
            self.args = copy.copy(self.args)
            self.args.max_grad_norm = 0.0
        attach_layerwise_callbacks(self)
        return optimizer

    return create_optimizer


def _wrap_get_learning_rates(original: Any) -> Any:
    @functools.wraps(original)
    def get_learning_rates(self: Any) -> list[Any]:
        name = optim_name(self.args.optim)
        spec = REGISTRY.get(name)
        actual = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's wrapper
        if spec is not None and spec.transformers_name and isinstance(actual, spec.optimizer_cls):
            return transformers_learning_rates(actual)
        return original(self)

    return get_learning_rates


def check_fsdp2_optimizer_checkpoint(trainer: Any, checkpoint: str | os.PathLike) -> None:
    """Check the sharded (DCP) optimizer state of the Trainer checkpoint `checkpoint` against `trainer`'s optimizer,
    when it is one of ours running under FSDP2; do nothing otherwise.

    accelerate loads that state (`load_fsdp_optimizer`) into a template of the loading optimizer's own state dict, so
    a checkpoint saved with other state-shaping settings (`rank`, `block_size`, `min_8bit_size`, ...) fails inside
    `torch.distributed.checkpoint` with a bare size mismatch of one tensor. [`check_dcp_checkpoint`] reads the
    checkpoint's metadata first and names the settings instead. Settings that keep the shapes (`seed`, `stagger`)
    are refused later by the optimizer's own `load_state_dict`, which accelerate reaches.

    Raises:
        [`InvalidConfigError`]: when the saved state does not fit the optimizer.
    """
    from ..optim.base import LowRankOptimizer
    from ..optim.checkpoint import check_dcp_checkpoint

    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    actual = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's wrapper
    if not getattr(trainer, "is_fsdp_enabled", False) or getattr(plugin, "fsdp_version", 1) != 2:
        return
    # accelerate's SHARDED_STATE_DICT folder (`{OPTIMIZER_NAME}_{index}`); FULL_STATE_DICT saves one whole state
    # (optimizer.bin) that our `load_state_dict` checks itself.
    folder = os.path.join(os.fspath(checkpoint), "optimizer_0")
    if isinstance(actual, LowRankOptimizer) and os.path.isdir(folder):
        check_dcp_checkpoint(trainer.model, trainer.optimizer, folder)


def _wrap_load_optimizer_and_scheduler(original: Any) -> Any:
    @functools.wraps(original)
    def _load_optimizer_and_scheduler(self: Any, checkpoint: Any, *args: Any, **kwargs: Any) -> None:
        if checkpoint is not None:
            check_fsdp2_optimizer_checkpoint(self, checkpoint)
        return original(self, checkpoint, *args, **kwargs)

    return _load_optimizer_and_scheduler


def register() -> None:
    """Make our names valid `optim=` choices and route the stock Trainer to our optimizers (idempotent).

    Raises:
        [`UnsupportedTransformersVersionError`]: when transformers lacks the internals we register into.
    """
    if _STATE.active:
        return
    import transformers
    from transformers import Trainer

    names = _optimizer_names()
    table = _handler_table()
    if table is None and not hasattr(Trainer, "get_optimizer_cls_and_kwargs"):
        raise UnsupportedTransformersVersionError(
            f"hf_galore supports transformers {supported_transformers() or 'as declared in its setup.cfg'}; the "
            f"installed {transformers.__version__} has neither the optimizer handler table nor "
            f"Trainer.get_optimizer_cls_and_kwargs. Install a supported version: {transformers_install_hint()}"
        )
    for name in REGISTRY:
        if _add_enum_member(names, name):
            _STATE.added_members.append(name)
    if table is not None:
        for name in REGISTRY:
            member = names(name)
            _STATE.replaced_handlers[member] = table.get(member)
            table[member] = _handler
    # With the table, the wrapper only validates optim_args (transformers parses them before calling the handler).
    _STATE.original_get_cls_and_kwargs = Trainer.__dict__["get_optimizer_cls_and_kwargs"]
    Trainer.get_optimizer_cls_and_kwargs = _wrap_get_cls_and_kwargs(
        _STATE.original_get_cls_and_kwargs.__func__, route=table is None
    )
    _STATE.had_own_missing = "_missing_" in names.__dict__
    _STATE.missing_hook = names.__dict__.get("_missing_")
    names._missing_ = classmethod(_missing)
    _STATE.original_create_optimizer = Trainer.__dict__["create_optimizer"]
    Trainer.create_optimizer = _wrap_create_optimizer(_STATE.original_create_optimizer)
    _STATE.original_init = Trainer.__dict__["__init__"]
    Trainer.__init__ = _wrap_init(_STATE.original_init)
    if "get_learning_rates" in Trainer.__dict__:
        _STATE.original_get_learning_rates = Trainer.__dict__["get_learning_rates"]
        Trainer.get_learning_rates = _wrap_get_learning_rates(_STATE.original_get_learning_rates)
    if "_load_optimizer_and_scheduler" in Trainer.__dict__:
        _STATE.original_load_optimizer = Trainer.__dict__["_load_optimizer_and_scheduler"]
        Trainer._load_optimizer_and_scheduler = _wrap_load_optimizer_and_scheduler(_STATE.original_load_optimizer)
    _STATE.active = True
    logger.debug("hf_galore registered optimizers: %s", ", ".join(REGISTRY))


def unregister() -> None:
    """Undo [`register`]: transformers' enum, handlers and Trainer methods are restored exactly."""
    if not _STATE.active:
        return
    from transformers import Trainer

    names = _optimizer_names()
    Trainer.create_optimizer = _STATE.original_create_optimizer
    Trainer.__init__ = _STATE.original_init
    if _STATE.original_get_learning_rates is not None:
        Trainer.get_learning_rates = _STATE.original_get_learning_rates
    if _STATE.original_load_optimizer is not None:
        Trainer._load_optimizer_and_scheduler = _STATE.original_load_optimizer
    if _STATE.had_own_missing:
        names._missing_ = _STATE.missing_hook
    else:
        del names._missing_
    table = _handler_table()
    if table is not None:
        for member, original in _STATE.replaced_handlers.items():
            if original is None:
                table.pop(member, None)
            else:
                table[member] = original
    if _STATE.original_get_cls_and_kwargs is not None:
        Trainer.get_optimizer_cls_and_kwargs = _STATE.original_get_cls_and_kwargs
    for name in _STATE.added_members:
        _remove_enum_member(names, name)
    _STATE.__init__()


def is_registered() -> bool:
    """Whether [`register`] is in effect."""
    return _STATE.active


def __getattr__(name: str) -> Any:
    # Deprecated: the supported range is written once, in setup.cfg's install_requires (`utils.versions`).
    if name == "SUPPORTED_TRANSFORMERS":
        import warnings

        warnings.warn(
            "hf_galore.integrations.transformers.SUPPORTED_TRANSFORMERS moved: call "
            "hf_galore.utils.versions.supported_transformers(); the old name will be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return supported_transformers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
