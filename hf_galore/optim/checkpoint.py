"""A check of a `torch.distributed.checkpoint` (DCP) optimizer checkpoint against the optimizer about to load it.

`dcp.load` fills the loading optimizer's own state dict (`get_optimizer_state_dict`), key by key, and refuses a
checkpoint whose tensors have other shapes with a bare size mismatch. The usual cause with GaLore-family optimizers is
a weight projected on another side: a checkpoint saved under FSDP2 (where `proj_type="std"` means the right side)
resumed on one process with `proj_type="std"`, which projects a wide weight (m < n) on the left. [`check_dcp_checkpoint`]
reads the checkpoint's metadata first and names the fix instead. The Trainer runs it by itself before accelerate
loads an FSDP2 checkpoint's sharded optimizer state (see `integrations/transformers.py`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import InvalidConfigError
from ..projection.subspace import Side
from ._sharding import is_dtensor
from .base import side_mismatch_message


def check_dcp_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str | os.PathLike, key: str = "optimizer"
) -> None:
    """Check that the optimizer state saved under `key` in the DCP checkpoint `checkpoint_id` fits `optimizer`.

    Call it on every process before `dcp.load` (it builds the same template `get_optimizer_state_dict` does, so it
    runs that function's collectives).

    Args:
        model (`torch.nn.Module`): The model whose parameters `optimizer` steps (sharded or not).
        optimizer (`torch.optim.Optimizer`): The optimizer that will load the checkpoint.
        checkpoint_id (`str` or `os.PathLike`): The checkpoint folder (`FileSystemReader`'s path).
        key (`str`, defaults to `"optimizer"`): The top-level key the optimizer state was saved under
            (`dcp.save({"model": ..., "optimizer": get_optimizer_state_dict(model, optimizer)}, ...)`).

    Raises:
        [`InvalidConfigError`]: when a weight was saved projected on another side than `optimizer` projects it
            (naming the `proj_type` to use), or when other state tensors are missing or have other shapes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    saved = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata().state_dict_metadata
    template = get_optimizer_state_dict(model, optimizer)
    params = dict(model.named_parameters())
    groups = {fqn: group for group in template["param_groups"] for fqn in group["params"]}
    with_state = {fqn for fqn in template["state"] if f"{key}.state.{fqn}.step" in saved}
    # The saved sides (plain ints in the checkpoint): a partial load of just those entries.
    sides = {fqn: {"side": -1} for fqn in with_state if "side" in template["state"][fqn]}
    if sides:
        dcp.load({key: {"state": sides}}, checkpoint_id=checkpoint_id)
    mismatches = []
    for fqn in sorted(with_state):
        state, prefix, group = template["state"][fqn], f"{key}.state.{fqn}.", groups.get(fqn, {})
        if fqn in sides and sides[fqn]["side"] != -1 and int(sides[fqn]["side"]) != int(state["side"]):
            p, proj_type = params[fqn], group.get("proj_type", "std")
            saved_side, side = Side(int(sides[fqn]["side"])), Side(int(state["side"]))
            message = side_mismatch_message(tuple(p.shape), saved_side, side, proj_type, is_dtensor(p))
            raise InvalidConfigError(f"Parameter {fqn!r}: {message}")
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            metadata: Any = saved.get(prefix + name)
            size = getattr(metadata, "size", None)
            if size is None or tuple(size) != tuple(value.shape):
                found = "missing" if metadata is None else f"saved with shape {tuple(size)}"
                mismatches.append(f"{fqn}.{name}: {found}, this optimizer has {tuple(value.shape)}")
    if mismatches:
        raise InvalidConfigError(
            f"The optimizer state in the checkpoint {os.fspath(checkpoint_id)!r} does not fit this optimizer "
            f"({'; '.join(mismatches[:5])}{'; ...' if len(mismatches) > 5 else ''}). It was saved by another "
            "optimizer or with settings that shape the state (rank, block_size, min_8bit_size, momentum); resume with "
            "the checkpoint's optimizer and settings."
        )
