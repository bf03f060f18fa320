"""Which layer-wise optimizer holds the backward hooks of a parameter (one at most).

A layer-wise optimizer consumes each gradient inside the parameter's post-accumulate-grad hook. A second optimizer
on the same parameters would then never see a gradient, so hooking a parameter that another live optimizer still
hooks is refused with an error naming that optimizer. The registry holds the parameters and the optimizers weakly:
it keeps neither alive.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import UnsupportedSetupError

_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def hook_owner(p: torch.Tensor) -> Any:
    """The live optimizer whose hooks are on `p`, or None."""
    ref = _OWNERS.get(p)
    owner = ref() if ref is not None else None
    if owner is None or not getattr(owner, "_hook_handles", None):
        return None
    return owner


def _owners_of(params: Iterable[torch.Tensor], optimizer: Any) -> list[tuple[torch.Tensor, Any]]:
    found = []
    for p in params:
        owner = hook_owner(p)
        if owner is not None and owner is not optimizer:
            found.append((p, owner))
    return found


def check_unhooked(params: Iterable[torch.Tensor], optimizer: Any) -> None:
    """Raise [`UnsupportedSetupError`] when another live layer-wise optimizer hooks one of `params`."""
    params = list(params)
    conflicts = _owners_of(params, optimizer)
    if conflicts:
        gc.collect()  # an old Trainer may only be alive through reference cycles: its finalizer removes the hooks
        conflicts = _owners_of(params, optimizer)
    if not conflicts:
        return
    p, owner = conflicts[0]
    raise UnsupportedSetupError(
        f"{len(conflicts)} parameter(s) (the first of shape {tuple(p.shape)}) still carry the backward hooks of "
        f"another layer-wise optimizer, a {type(owner).__name__} that is still alive (e.g. the optimizer of an "
        f"earlier Trainer whose training was interrupted). Its hooks would consume every gradient before this "
        f"{type(optimizer).__name__} sees it. Call `remove_hooks()` on the old optimizer (e.g. "
        "`old_trainer.optimizer.remove_hooks()`) or delete it (`del old_trainer`) before building a new one."
    )


def claim(params: Iterable[torch.Tensor], optimizer: Any) -> None:
    """Record `optimizer` as the owner of the hooks of `params`."""
    ref = weakref.ref(optimizer)
    for p in params:
        _OWNERS[p] = ref


def release(params: Iterable[torch.Tensor], optimizer: Any) -> None:
    """Forget `optimizer` as the owner of the hooks of `params`."""
    for p in params:
        ref = _OWNERS.get(p)
        if ref is not None and ref() in (None, optimizer):
            del _OWNERS[p]
