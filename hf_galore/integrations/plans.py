"""One [`OptimizerPlan`] per Trainer: `optim_args` parsed and validated once, then handed to every consumer.

The consumers do not share a call stack: the setup checks and the model surgery run in the wrapped
`Trainer.__init__`, `WeLoreCallback` reads its split settings in `on_init_end`, and the optimizer is built by a
handler that transformers calls with `(args, model)` only. So the wrapped `Trainer.__init__` and
`Trainer.create_optimizer` mark the Trainer they run for ([`building`]), and [`plan_for`] keeps the plan on that
Trainer, keyed on the values of the `TrainingArguments` it was built from: arguments changed between `__init__` and
`train()` get a new plan (validated again), unchanged ones reuse it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from ..builder import OptimizerPlan, plan_optimizer
from ..registry import optim_name

_TRAINER: ContextVar[Any] = ContextVar("hf_galore_trainer", default=None)

#: Attribute of the Trainer holding `(key, plan)`.
_PLAN_ATTRIBUTE = "_hf_galore_plan"


@contextmanager
def building(trainer: Any) -> Iterator[None]:
    """Mark `trainer` as the Trainer that [`plan_for`] caches on, for the duration of the block."""
    token = _TRAINER.set(trainer)
    try:
        yield
    finally:
        _TRAINER.reset(token)


def current_trainer() -> Any:
    """The Trainer whose `__init__` or `create_optimizer` is running (see [`building`]), or None."""
    return _TRAINER.get()


def _plan_key(args: Any, name: str) -> tuple[Any, ...]:
    """Everything of `args` an [`OptimizerPlan`] depends on (`repr` for the str-or-dict/list values)."""
    return (
        name,
        repr(args.optim_args),
        args.learning_rate,
        args.weight_decay,
        args.adam_beta1,
        args.adam_beta2,
        args.adam_epsilon,
        repr(args.optim_target_modules),
    )


def plan_for(args: Any, name: Any = None, trainer: Any = None) -> OptimizerPlan:
    """The [`OptimizerPlan`] of `optim=name` (default `args.optim`) with these `TrainingArguments`.

    With a `trainer`, the plan is kept on it and reused while the relevant arguments keep their values, so
    `optim_args` are parsed once per Trainer and the model surgery it records runs once.

    Raises:
        [`UnknownOptimizerError`], [`InvalidConfigError`], [`MissingDependencyError`].
    """
    name = optim_name(args.optim if name is None else name)
    key = _plan_key(args, name)
    cached = getattr(trainer, _PLAN_ATTRIBUTE, None) if trainer is not None else None
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = plan_optimizer(
        name,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        optim_args=args.optim_args,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        target_modules=args.optim_target_modules,
    )
    if trainer is not None:
        setattr(trainer, _PLAN_ATTRIBUTE, (key, plan))
    return plan
