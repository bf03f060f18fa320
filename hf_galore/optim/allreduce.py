"""All-reduce, at the end of backward, the gradients of parameters that DDP does not own.

Some parameters cannot be wrapped by `DistributedDataParallel`: Q-GaLore's gradient carriers are one-element tensors
seen as m×n through zero strides, and DDP's wrap-time broadcast writes into every element of each parameter. They
are kept out of DDP's reducer (`_ddp_params_and_buffers_to_ignore`), and [`BackwardAllReduce`] gives their
gradients what DDP gives its own: when the backward pass of a synchronising micro-step (the last one of gradient
accumulation) ends, every gradient is replaced by its mean over the processes. Whatever reads gradients after
backward, the Trainer's `clip_grad_norm_` and its logged `grad_norm` included, sees the global gradient.

Why at the end of backward and not in `optimizer.step()`: the Trainer clips (and measures the logged norm) between
the two, so a reduction inside `step()` would clip each process' local gradient, with a local norm. The end of
backward is also where DDP itself finishes its reduction (its reducer queues the same kind of autograd-engine
callback), so every process issues the collectives in the same place of its program.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist


def _always_sync() -> bool:
    return True


def _remove_handles(handles: list[Any]) -> None:
    """Finalizer of a [`BackwardAllReduce`]: take its hooks off the parameters (holds no reference to it)."""
    for handle in handles:
        handle.remove()
    handles.clear()


class BackwardAllReduce:
    """Average the gradients of `params` over the processes of the default group at the end of each synchronising
    backward pass, as DDP does for the parameters it wraps.

    A post-accumulate-grad hook on each parameter queues an autograd-engine callback, on the micro-steps where
    `sync_gradients()` is True; the first of them to run reduces. It runs when the backward pass has finished, so with
    gradient accumulation it reduces the locally accumulated sum of the micro-steps, exactly like DDP after
    `no_sync()`. It first all-reduces one "has a gradient" flag per parameter, then averages, in the order of
    `params` (the same on every process), every gradient that some process has; a process without one contributes
    zeros. So processes that use different weights (mixture of experts, layer drop) still pair their collectives,
    provided each process' synchronising backward reaches at least one of `params`.

    Reducing on a micro-step that did not need it costs communication, never correctness: the mean is linear, so
    averaging an already averaged gradient plus new local contributions gives the mean of everything (this also
    covers reentrant activation checkpointing, whose nested backward passes run the callback early).

    Args:
        params (`Iterable[torch.Tensor]`): The parameters DDP does not own, in the same order on every process.
        sync_gradients (`Callable[[], bool]`, *optional*): Returns False on micro-steps that only accumulate (the
            Trainer integration passes accelerate's `GradientState().sync_gradients`). Default: always True.
    """

    def __init__(self, params: Iterable[torch.Tensor], sync_gradients: Callable[[], bool] | None = None) -> None:
        self.params = list(params)
        self._sync_gradients = sync_gradients or _always_sync
        self._world_size = dist.get_world_size()
        self._pending = False
        self._handles: list[Any] = []
        self._finalizer: weakref.finalize | None = None
        self.install_hooks()

    @property
    def hooks_installed(self) -> bool:
        """Whether the post-accumulate-grad hooks are on the parameters."""
        return bool(self._handles)

    def set_sync_source(self, sync_gradients: Callable[[], bool]) -> None:
        """Read the accumulation boundary from `sync_gradients` from now on."""
        self._sync_gradients = sync_gradients

    def install_hooks(self) -> None:
        """Put the hooks on the parameters (done at construction; idempotent). They hold this object weakly."""
        if self._handles:
            return
        this = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            reducer = this()
            if reducer is not None:
                reducer._on_gradient()

        self._handles.extend(p.register_post_accumulate_grad_hook(hook) for p in self.params)
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    def remove_hooks(self) -> None:
        """Take the hooks off, so that a later backward (e.g. of another training run) is not reduced by this one."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        _remove_handles(self._handles)

    def _on_gradient(self) -> None:
        if not self._sync_gradients():
            return
        self._pending = True
        # The engine runs queued callbacks once the current backward pass has finished (DDP's reducer and FSDP finish
        # their reductions the same way); there is no public API for it. One callback per hook call, the first doing
        # the work: an "already queued" flag would stay set after a backward pass that failed before its callbacks
        # ran (e.g. an out-of-memory error that the caller catches), and silently stop every later reduction.
        torch.autograd.Variable._execution_engine.queue_callback(self._reduce_pending)

    def _reduce_pending(self) -> None:
        if self._pending:
            self.reduce()

    @torch.no_grad()
    def reduce(self) -> None:
        """Replace every gradient of `params` that some process has by its mean over the processes (a collective:
        every process calls it at the same point; the hooks do that at the end of backward)."""
        self._pending = False
        device = self.params[0].device
        flags = torch.tensor([float(p.grad is not None) for p in self.params], device=device)
        dist.all_reduce(flags)
        works = []
        for p, flag in zip(self.params, flags.tolist()):
            if flag == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)  # dense: a carrier's data is a view
            works.append((p.grad, dist.all_reduce(p.grad, async_op=True)))
        for grad, work in works:
            work.wait()
            grad.div_(self._world_size)
