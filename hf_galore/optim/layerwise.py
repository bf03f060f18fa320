"""Layer-wise (per-parameter) stepping: each parameter is handled inside its post-accumulate-grad hook.

The full gradient of a weight is freed as soon as the hook has used it, so the gradients of the whole model are
never alive at once (how GaLore fits LLaMA-7B on a 24 GB card). Unlike the published implementations:

* the layer-wise optimizer *is* the real optimizer (a subclass of it), so the Trainer's LR scheduler drives its
  param groups, the logged learning rate is the applied one, and `state_dict()` holds every per-parameter state,
  so Trainer checkpoints resume exactly;
* **gradient accumulation** updates once per optimizer step, at the accumulation boundary (the hook reads the
  Trainer's `sync_gradients` flag). Between refreshes a projected weight accumulates its *projected* gradient
  (r×n instead of m×n) and frees the full one at every micro-step. On an optimizer step that refreshes the basis,
  the full gradient is kept across that step's micro-steps, because the new basis must come from the whole
  accumulated gradient (with `stagger=true` only a fraction of the weights refresh on any one step);
* **clipping** (`max_grad_norm`): the hooks record each gradient's norm and keep the small projected gradients;
  the updates run in `step()` once the global norm is known, scaled exactly as `clip_grad_norm_` would scale the
  full gradients. The norm is exact on one process without accumulation and on refresh steps; with accumulation
  or several processes it uses the norm of the (all-reduced) projected gradient for projected weights, a lower
  bound, and warns once;
* **data parallel**: projected weights are taken out of DDP's reducer (the Trainer integration sets
  `_ddp_params_and_buffers_to_ignore` before the wrap). Their hooks only accumulate locally (the projected gradient,
  or the full one on a refresh step); `step()` then all-reduces them in the same order on every rank, after one
  all-reduce of "has a gradient" flags, so ranks that use different weights (mixture of experts, layer drop) still
  pair their collectives. That is m/r less traffic than DDP's full-gradient all-reduce (the full gradient is
  all-reduced only on refresh steps, so every rank derives the same basis). Other parameters stay with DDP and are
  updated in `step()` after its reduction;
* a weight whose hook fires again after its update in the same step (reused across reentrant activation-checkpoint
  segments) raises instead of being stepped twice; a weight with no gradient on the last micro-step is still updated
  from what earlier micro-steps accumulated;
* the true gradient norm of each step is kept in `last_grad_norm` (the Trainer's own norm pass runs after the hooks
  freed the gradients).

Parameters listed in `deferred_params` (tied weights, whose hook can fire more than once per backward under
activation checkpointing) keep their full gradient and are updated in `step()`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..errors import NotAPlaceholderError, UnsupportedSetupError
from ..projection.subspace import Side, project
from ..utils.deprecation import moved_attributes
from ._hooks import check_unhooked, claim, release
from .base import LowRankOptimizer


def _always_sync() -> bool:
    return True


def _norm_sq(tensor: torch.Tensor) -> torch.Tensor:
    """‖tensor‖², accumulated in fp32 for bf16/fp16 gradients and in float64 for float64 ones."""
    return torch.linalg.vector_norm(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32)).square()


def _remove_handles(handles: list[Any]) -> None:
    """Finalizer of a layer-wise optimizer: take its hooks off the parameters (holds no reference to it)."""
    for handle in handles:
        handle.remove()
    handles.clear()


class LayerwiseMixin:
    """Turn a [`LowRankOptimizer`] subclass into a layer-wise one (mix in *before* the optimizer class).

    A subclass with `updates_in_hooks = False` keeps only the accumulation in the hooks and applies every update in
    `step()` (FLoRA's non-layer-wise names with compressed gradient accumulation).

    Args:
        max_grad_norm (`float`, *optional*): Clip the global gradient norm to this value (0 or None: no clipping).
        sync_gradients (`Callable[[], bool]`, *optional*): Returns False on micro-steps that only accumulate
            (the Trainer integration passes accelerate's `GradientState().sync_gradients`). Default: always True.
        ddp_params (`Iterable[torch.Tensor]`, *optional*): Parameters whose gradient DDP reduces; they are updated
            in `step()` after the reduction. The other parameters are all-reduced by the hooks when
            `torch.distributed` is initialized with more than one process.
        deferred_params (`Iterable[torch.Tensor]`, *optional*): Parameters to update in `step()` from their full
            gradient (e.g. tied weights).
    """

    #: Whether the hooks apply the updates at the accumulation boundary (layer-wise) or leave them to `step()`.
    updates_in_hooks: bool = True

    #: The hooks' reductions and broadcasts assume replicated parameters: FSDP2's DTensor shards are refused.
    supports_row_sharding: ClassVar[bool] = False

    def __init__(
        self,
        *args: Any,
        max_grad_norm: float | None = None,
        sync_gradients: Callable[[], bool] | None = None,
        ddp_params: Iterable[torch.Tensor] = (),
        deferred_params: Iterable[torch.Tensor] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_grad_norm = max_grad_norm or 0.0
        self._sync_gradients = sync_gradients or _always_sync
        self._ddp_params = {id(p) for p in ddp_params}
        self._deferred = {id(p) for p in deferred_params} | self._ddp_params
        self._world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._group_index = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}  # type: ignore[attr-defined]
        # Transient per-step buffers (empty between optimizer steps, so never part of a checkpoint).
        self._low_rank_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._ready: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._applied: set[int] = set()  # weights updated (or queued) in the current optimizer step
        self._grad_sq_sum: torch.Tensor | None = None
        self._norm_is_exact = True
        self.last_grad_norm: torch.Tensor | None = None
        self._hook_handles: list[Any] = []
        self._hooks_finalizer: weakref.finalize | None = None
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if self._world_size > 1 and id(p) not in self._ddp_params:
                    for tensor in self._value_tensors(p):  # type: ignore[attr-defined]
                        dist.broadcast(tensor, src=0)  # DDP does not sync the weights it ignores
        self.install_hooks()

    @classmethod
    def _state_kind(cls) -> str:
        # The state is the base optimizer's: a layer-wise checkpoint resumes the plain optimizer and vice versa.
        base = next(c for c in cls.__mro__ if issubclass(c, LowRankOptimizer) and not issubclass(c, LayerwiseMixin))
        return base.__name__

    @property
    def has_sync_source(self) -> bool:
        """Whether a `sync_gradients` callable was given (otherwise every backward counts as an optimizer step)."""
        return self._sync_gradients is not _always_sync

    def set_sync_source(self, sync_gradients: Callable[[], bool]) -> None:
        """Read the accumulation boundary from `sync_gradients` from now on (for an optimizer built by hand)."""
        self._sync_gradients = sync_gradients

    @property
    def optimizer_dict(self) -> dict[torch.Tensor, torch.optim.Optimizer]:
        """Not available: transformers' layer-wise placeholder keeps one optimizer per parameter, this is the real one.

        Raises:
            [`NotAPlaceholderError`] (an `AttributeError`) naming what to read instead.
        """
        raise NotAPlaceholderError(
            f"{type(self).__name__} has no `optimizer_dict`: transformers' layer-wise GaLore hands the Trainer a "
            "placeholder (LayerWiseDummyOptimizer) over one optimizer per parameter, but hf_galore's layer-wise "
            "optimizer is the real optimizer. Read `optimizer.param_groups` (the Trainer's scheduler drives their "
            "'lr'), `optimizer.state[param]` and `optimizer.state_dict()` directly; "
            "`trainer.get_learning_rates()` and the logged learning rate work as for any optimizer."
        )

    # ------------------------------------------------------------------------------------------------ hooks
    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        # Looked up at call time: load_state_dict replaces the group dicts.
        return self.param_groups[self._group_index[id(p)]]  # type: ignore[attr-defined]

    def _add_norm(self, sq: torch.Tensor) -> None:
        self._grad_sq_sum = sq if self._grad_sq_sum is None else self._grad_sq_sum + sq.to(self._grad_sq_sum)

    def _all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size > 1:
            dist.all_reduce(tensor)
            tensor.div_(self._world_size)
        return tensor

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if id(p) in self._applied:
            raise UnsupportedSetupError(
                f"The gradient hook of a weight of shape {tuple(p.shape)} fired again after its update in the same "
                "optimizer step: the weight is used in more than one reentrant activation-checkpointing segment, or "
                "backward ran twice before step(). Use gradient_checkpointing_kwargs={'use_reentrant': False}, or "
                "pass the weight in deferred_params so it is updated in step(). If this optimizer belongs to a "
                "finished or abandoned training run, its hooks are still on the model and consume the gradients of "
                "the new one: call its remove_hooks()."
            )
        group = self._group_of(p)
        state = self._state_for(p, group)  # type: ignore[attr-defined]
        sync = self._sync_gradients()
        distributed = self._world_size > 1
        side = Side(state["side"])
        if side == Side.NONE or (
            self._full_gradient_step(p, state, group)
            if distributed
            else self._keeps_full_gradient(p, state, group, sync)
        ):
            if not sync or distributed:
                return  # keep the full gradient: autograd accumulates it; under DDP step() all-reduces it
            self._complete_full(p, p.grad, group)
            return
        low = self._compress_gradient(p, p.grad, state)
        accumulated = self._low_rank_grads.pop(p, None)
        if accumulated is not None:
            low = accumulated.add_(low)
        if not sync or distributed:
            # Between micro-steps (and under DDP until step() reduces it in a fixed order) keep only the small tensor.
            self._low_rank_grads[p] = low
            p.grad = None
            return
        if accumulated is not None:
            self._norm_is_exact = False
            self._add_norm(_norm_sq(low))
        else:
            self._add_norm(_norm_sq(p.grad))
        p.grad = None
        self._finish(p, low, group)

    def _complete_full(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """A full (accumulated, reduced) gradient is final: record its norm, refresh/project it, and finish."""
        self._add_norm(_norm_sq(grad))
        prepared = self._prepare_gradient(p, grad, group)  # type: ignore[attr-defined]
        p.grad = None
        if prepared is not None:
            self._finish(p, prepared, group)

    # Two overridable decisions of the hook (FLoRA overrides both; GaLore keeps these defaults).
    def _keeps_full_gradient(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], sync: bool) -> bool:
        """Whether this micro-step keeps (or uses) the full gradient instead of the compressed accumulator.

        GaLore: on steps that refresh the basis, whose SVD needs the whole accumulated gradient.
        """
        return self._refresh_due(state, group)  # type: ignore[attr-defined]

    def _full_gradient_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Under DDP: whether this optimizer step all-reduces the full gradient of `p` (decided from state only, so
        every rank agrees). GaLore: on refresh steps."""
        return self._refresh_due(state, group)  # type: ignore[attr-defined]

    def _compress_gradient(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The small tensor accumulated (and all-reduced) between optimizer steps; GaLore: the projected gradient."""
        return project(grad, Side(state["side"]), *self._bases(state))  # type: ignore[attr-defined]

    def _finish(self, p: torch.Tensor, prepared: torch.Tensor, group: dict[str, Any]) -> None:
        """Apply now, or (with clipping, or without `updates_in_hooks`) in `step()`."""
        if self.max_grad_norm > 0 or not self.updates_in_hooks:
            self._ready.append((p, prepared))
            self._applied.add(id(p))
            if p.grad is not None:
                p.grad = None
            return
        if self._finite_only([(p, prepared)]):  # type: ignore[attr-defined]
            self._apply_update(p, prepared, group)  # type: ignore[attr-defined]
        self._applied.add(id(p))
        p.grad = None

    def _flush_pending(self) -> None:
        """One process: finish weights whose hook did not fire on the last micro-step (no gradient there) but that
        hold what earlier micro-steps accumulated, exactly as their hook would have."""
        for p in list(self._low_rank_grads):
            low = self._low_rank_grads.pop(p)
            self._norm_is_exact = False
            self._add_norm(_norm_sq(low))
            self._finish(p, low, self._group_of(p))
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if id(p) not in self._deferred and id(p) not in self._applied and p.grad is not None:
                    self._on_gradient(p)

    def _reduce_in_order(self) -> None:
        """Several processes: all-reduce every weight DDP does not own, in the same order on every rank.

        The hooks only accumulate locally. A first all-reduce of per-weight "has a gradient" flags tells every rank
        which weights some rank produced a gradient for (a rank without one contributes zeros), so collectives always
        pair up, even when ranks use different weights (mixture of experts, layer drop).
        """
        candidates = [(p, g) for g in self.param_groups for p in g["params"] if id(p) not in self._ddp_params]  # type: ignore[attr-defined]
        if not candidates:
            return
        device = candidates[0][0].device
        flags = torch.tensor(
            [float(p.grad is not None or p in self._low_rank_grads) for p, _ in candidates], device=device
        )
        dist.all_reduce(flags)
        for (p, group), flag in zip(candidates, flags.tolist()):
            if flag == 0:
                continue
            state = self._state_for(p, group)  # type: ignore[attr-defined]
            if Side(state["side"]) == Side.NONE or self._full_gradient_step(p, state, group):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                self._complete_full(p, self._all_reduce_mean(grad), group)
                continue
            low = self._low_rank_grads.pop(p, None)
            if p.grad is not None:  # a deferred (tied) weight still holds its full gradient
                extra = self._compress_gradient(p, p.grad, state)
                low = extra if low is None else low.add_(extra)
                p.grad = None
            if low is None:
                low = self._compress_gradient(p, torch.zeros_like(p), state)
            low = self._all_reduce_mean(low)
            self._norm_is_exact = False
            self._add_norm(_norm_sq(low))
            self._ready.append((p, low))

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Finish the optimizer step: update deferred parameters, apply clipped updates, record the gradient norm.

        A `closure` is run first (and its loss returned), so its backward runs the hooks.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._sync_gradients():
            return loss
        if self._world_size > 1:
            self._reduce_in_order()
        else:
            self._flush_pending()
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if id(p) in self._deferred and p.grad is not None and id(p) not in self._applied:
                    # DDP has reduced its own gradients already; deferred (tied) ones are complete now.
                    self._add_norm(_norm_sq(p.grad))
                    prepared = self._prepare_gradient(p, p.grad, group)  # type: ignore[attr-defined]
                    if prepared is not None:
                        self._ready.append((p, prepared))
        norm = self._grad_sq_sum.sqrt() if self._grad_sq_sum is not None else None
        coefficient = None
        if self.max_grad_norm > 0 and norm is not None:
            if not self._norm_is_exact:
                self._warn_once(  # type: ignore[attr-defined]
                    "approximate_norm",
                    "Layer-wise clipping with gradient accumulation or several processes measures compressed "
                    "weights by the norm of their accumulated, all-reduced compressed gradient (for GaLore's "
                    "orthonormal bases a lower bound of the full gradient's norm, exact on refresh steps; for FLoRA's "
                    "random projections an estimate); the full gradients are never kept.",
                )
            coefficient = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        by_group: dict[int, tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        for p, prepared in self._ready:
            if coefficient is not None:
                prepared = prepared * coefficient.to(prepared)
            group = self._group_of(p)
            by_group.setdefault(id(group), (group, []))[1].append((p, prepared))
            p.grad = None
        for group, items in by_group.values():
            self._apply_updates(self._finite_only(items), group)  # type: ignore[attr-defined]
        self._ready.clear()
        self._applied.clear()
        self.last_grad_norm = norm
        self._grad_sq_sum = None
        self._norm_is_exact = True
        return loss

    # ------------------------------------------------------------------------------------------------ hooks' lifetime
    def _hooked_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if id(p) not in self._deferred]  # type: ignore[attr-defined]

    @property
    def hooks_installed(self) -> bool:
        """Whether the per-parameter backward hooks are on the model."""
        return bool(self._hook_handles)

    def install_hooks(self) -> None:
        """Put the per-parameter backward hooks on the parameters (done at construction; idempotent).

        The hooks hold the optimizer weakly: an optimizer that is garbage no longer consumes gradients, and its
        finalizer takes the hooks off. The Trainer integration removes them when training ends and installs them
        again when a training run (or a resumed one) begins.

        Raises:
            [`UnsupportedSetupError`]: another live layer-wise optimizer hooks some of the parameters.
        """
        if self._hook_handles:
            return
        params = self._hooked_params()
        check_unhooked(params, self)
        this = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            optimizer = this()
            if optimizer is not None:
                optimizer._on_gradient(p)

        self._hook_handles.extend(p.register_post_accumulate_grad_hook(hook) for p in params)
        claim(params, self)
        self._hooks_finalizer = weakref.finalize(self, _remove_handles, self._hook_handles)

    def remove_hooks(self) -> None:
        """Take the per-parameter hooks off the parameters, so that a later backward leaves its gradients in `.grad`
        for whoever uses the model next (the optimizer then only updates deferred parameters in `step()`). Called by
        the Trainer integration when training ends; [`install_hooks`] puts them back."""
        if self._hooks_finalizer is not None:
            self._hooks_finalizer.detach()
            self._hooks_finalizer = None
        _remove_handles(self._hook_handles)
        release(self._hooked_params(), self)


def is_layerwise(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` updates parameters from backward hooks."""
    return isinstance(optimizer, LayerwiseMixin)


# Deprecated: GaLore's layer-wise optimizers were declared here before they moved to `hf_galore.methods.galore`.
__getattr__ = moved_attributes(
    __name__,
    dict.fromkeys(
        ("GaLoreAdamWLayerwise", "GaLoreAdamW8bitLayerwise", "GaLoreAdafactorLayerwise"),
        "hf_galore.methods.galore.optimizer",
    ),
)
