"""`TrainerCallback`s of hf_galore."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..optim.layerwise import is_layerwise
from ..registry import optim_name
from .plans import current_trainer, plan_for


class LayerwiseGradNormCallback(TrainerCallback):
    """Log the true gradient norm of layer-wise optimizers.

    The Trainer measures `grad_norm` after backward, when a layer-wise optimizer has already applied and freed every
    gradient, so it would log 0.0 (transformers 5.x) or nothing (4.x, which only logs it when clipping). The
    optimizer keeps the real norm of each step; this callback writes it into every training log (and the log
    history). The Trainer integration adds it automatically.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        norm = getattr(self.optimizer, "last_grad_norm", None)
        if logs is None or "loss" not in logs or norm is None:
            return
        value = float(norm)
        logs["grad_norm"] = value
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1]["grad_norm"] = value


class BackwardHooksCallback(TrainerCallback):
    """Keep an optimizer's backward hooks on the model only while its Trainer trains.

    Left on after `train()`, the hooks would act on the gradients of whatever uses the model next (a second
    Trainer, a plain `loss.backward()`): a layer-wise optimizer's consume them, Q-GaLore's multi-process gradient
    averaging ([`BackwardAllReduce`]) would start collectives. They are removed at `on_train_end` and installed again
    at `on_train_begin` (a second `train()` or a resume on the same Trainer). The Trainer integration adds it
    automatically.

    Args:
        owner: The object holding the hooks, with `install_hooks()` and `remove_hooks()` (a layer-wise optimizer,
            or an optimizer's `gradient_reduction`).
    """

    def __init__(self, owner: Any) -> None:
        self.optimizer = owner

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer.install_hooks()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer.remove_hooks()


class LayerwiseHooksCallback(BackwardHooksCallback):
    """[`BackwardHooksCallback`] for a layer-wise optimizer (its hooks consume each gradient in backward)."""


def attach_layerwise_callbacks(trainer: Any) -> None:
    """Add [`LayerwiseGradNormCallback`] and [`LayerwiseHooksCallback`] in front of the Trainer's callbacks when its
    optimizer is layer-wise, or a [`BackwardHooksCallback`] when it averages gradients in backward hooks itself
    (`q_galore_adamw_8bit` on several processes)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    reduction = getattr(optimizer, "gradient_reduction", None)
    if is_layerwise(optimizer):
        ours = [LayerwiseGradNormCallback(optimizer), LayerwiseHooksCallback(optimizer)]
    elif reduction is not None:
        ours = [BackwardHooksCallback(reduction)]
    else:
        return
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [c for c in callbacks if not isinstance(c, (LayerwiseGradNormCallback, BackwardHooksCallback))]
    callbacks[:0] = ours


class WeLoreCallback(TrainerCallback):
    """Run the WeLore LRC/N-LRC split when the Trainer is created (`on_init_end`).

    `on_init_end` fires at the end of `Trainer.__init__`: before `train(resume_from_checkpoint=...)` loads a
    checkpoint into the model, before the optimizer is created and before any DDP/accelerate wrap. Splitting there
    is what makes resuming work (the checkpoint's factor weights find matching modules), and it works with any
    optimizer: frozen N-LRCs simply have `requires_grad=False`. With `optim="welore_adamw"` the optimizer's own
    model preparation sees the model is already split and does not split again.

    Args:
        config ([`WeLoreConfig`], `dict` or `str`, *optional*): Split settings. Defaults to the WeLore keys of
            `args.optim_args` when `args.optim` is a `welore_*` name, else `WeLoreConfig()`.
        target_modules (`str` or `list[str]`, *optional*): Which Linears to consider; defaults to
            `args.optim_target_modules`, else `"all-linear"`.

    Example:
        ```python
        >>> args = TrainingArguments("out", optim="welore_adamw", optim_args="target_compression=0.5")
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[WeLoreCallback()])
        >>> trainer.callback_handler.callbacks[-1].plan.summary()  # the split that was made
        ```
    """

    def __init__(self, config: Any = None, target_modules: Any = None) -> None:
        self.config = config
        self.target_modules = target_modules
        self.plan: Any = None

    def _config(self, args: Any) -> Any:
        from ..methods.welore import WELORE_OPTIMIZERS, WeLoreConfig, resolve_config

        if self.config is not None:
            return resolve_config(self.config)
        name = optim_name(args.optim)
        if name in WELORE_OPTIMIZERS:
            # The plan the Trainer's __init__ validated before the stock constructor (which fires on_init_end).
            return plan_for(args, name, current_trainer()).config(WeLoreConfig)
        return WeLoreConfig()

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        from ..methods.welore import prepare_for_training

        if model is None:
            from ..errors import InvalidConfigError

            raise InvalidConfigError(
                "WeLoreCallback needs the Trainer's model, got None; pass model=... to the Trainer."
            )
        targets = self.target_modules or getattr(args, "optim_target_modules", None) or "all-linear"
        self.plan = prepare_for_training(model, self._config(args), targets)
