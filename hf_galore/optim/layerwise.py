"""Layer-wise (per-parameter) stepping: each parameter is updated inside its post-accumulate-grad hook.

The full gradient of a weight is freed as soon as its update is applied, so the gradients of the whole model are
never alive at once (how GaLore fits LLaMA-7B on a 24 GB card). Unlike the published implementations:

* the layer-wise optimizer *is* the real optimizer (a subclass of it), so the Trainer's LR scheduler drives its
  param groups, the logged learning rate is the applied one, and `state_dict()` holds every per-parameter state,
  so Trainer checkpoints resume exactly;
* `step()` is a no-op (the updates already happened during backward); `zero_grad()` has nothing left to clear.

Gradient accumulation, gradient clipping, fp16 loss scaling and multi-process training need the update to wait for
(or see) more than one parameter's gradient; they are rejected before training by the Trainer integration
([`UnsupportedSetupError`]) until they are supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit


class LayerwiseMixin:
    """Turn a [`LowRankOptimizer`] subclass into a layer-wise one (mix in *before* the optimizer class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grad_sq_sum: torch.Tensor | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self._hook_handles: list[Any] = []
        for group_index, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            for p in group["params"]:
                handle = p.register_post_accumulate_grad_hook(self._make_hook(group_index))
                self._hook_handles.append(handle)

    def _make_hook(self, group_index: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            # Look the group up at call time: load_state_dict replaces the group dicts.
            group = self.param_groups[group_index]  # type: ignore[attr-defined]
            with torch.no_grad():
                # The Trainer's own norm pass runs after backward, when the gradients are gone: keep the true
                # norm of this step here (one read of a gradient that the update reads anyway).
                sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
                self._grad_sq_sum = sq if self._grad_sq_sum is None else self._grad_sq_sum + sq.to(self._grad_sq_sum)
                self._step_param(p, group)  # type: ignore[attr-defined]
            p.grad = None

        return hook

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Close the step: the parameters were already updated by the hooks during backward.

        Records the global gradient norm of the step in `last_grad_norm` (a 0-d tensor). A `closure` is run (and its
        loss returned) before, so its backward performs the updates.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._grad_sq_sum is not None:
            self.last_grad_norm = self._grad_sq_sum.sqrt()
            self._grad_sq_sum = None
        return loss

    def remove_hooks(self) -> None:
        """Detach the per-parameter hooks (the optimizer then no longer updates anything)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


class GaLoreAdamWLayerwise(LayerwiseMixin, GaLoreAdamW):
    """[`GaLoreAdamW`] stepping each parameter inside its post-accumulate-grad hook."""


class GaLoreAdamW8bitLayerwise(LayerwiseMixin, GaLoreAdamW8bit):
    """[`GaLoreAdamW8bit`] stepping each parameter inside its post-accumulate-grad hook."""


class GaLoreAdafactorLayerwise(LayerwiseMixin, GaLoreAdafactor):
    """[`GaLoreAdafactor`] stepping each parameter inside its post-accumulate-grad hook."""


def is_layerwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` updates parameters from backward hooks."""
    return isinstance(optimizer, LayerwiseMixin)
