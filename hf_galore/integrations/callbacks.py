"""`TrainerCallback`s of hf_galore."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..optim.layerwise import is_layerwise


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


def attach_layerwise_callbacks(trainer: Any) -> None:
    """Add [`LayerwiseGradNormCallback`] in front of the Trainer's callbacks when its optimizer is layer-wise."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if not is_layerwise(optimizer):
        return
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [c for c in callbacks if not isinstance(c, LayerwiseGradNormCallback)]
    callbacks.insert(0, LayerwiseGradNormCallback(optimizer))
