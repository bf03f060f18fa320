"""Row-sharded (FSDP2) parameters as the low-rank skeleton sees them.

FSDP2 (`torch.distributed.fsdp.fully_shard`) hands the optimizer DTensor parameters and gradients with one
`Shard(0)` placement over a 1-D device mesh: each process holds a contiguous block of rows (`torch.chunk`'s split).
The skeleton steps on the local blocks (`to_local()`: in-place updates of the local tensor update the shard) and
keeps every decision that depends on the weight's shape (side, rank fallback, seeds) on the global shape.

Anything else (a replicated or 2-D mesh such as HSDP, a shard on another dimension, several placements) is refused
with [`UnsupportedSetupError`] before the first step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import UnsupportedSetupError

try:  # torch.distributed is optional in some torch builds
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor`."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The process-local tensor of a DTensor (the same storage: in-place updates reach the shard), else `tensor`."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclasses.dataclass(frozen=True)
class RowSharding:
    """Where this process' rows of a row-sharded parameter sit: rows `offset : offset + local_rows` of `rows`.

    Attributes:
        group: The process group of the parameter's 1-D device mesh (collectives of a refresh run on it).
        offset: Index of this process' first row in the global parameter.
        rows: Rows of the global parameter (m).
        local_rows: Rows this process holds (m_k; 0 when a small parameter leaves this process nothing).
    """

    group: Any
    offset: int
    rows: int
    local_rows: int


def row_sharding(p: torch.Tensor, owner: str = "hf_galore") -> RowSharding | None:
    """The [`RowSharding`] of a DTensor parameter, None for a plain tensor.

    Raises:
        [`UnsupportedSetupError`]: when `p` is a DTensor with another layout than one `Shard(0)` over a 1-D mesh.
    """
    if not is_dtensor(p):
        return None
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise UnsupportedSetupError(
            f"{owner} got a DTensor parameter of shape {tuple(p.shape)} with placements {placements} on a "
            f"{mesh.ndim}-D device mesh; it supports FSDP2's layout only: one Shard(0) placement over a 1-D mesh "
            "(`fully_shard(model, mesh=init_device_mesh(device, (world_size,)))`). Replicated, HSDP (2-D mesh) and "
            "tensor-parallel layouts are not supported."
        )
    rows, world, coordinate = int(p.shape[0]), mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(rows / world) if rows else 0
    offset = min(coordinate * chunk, rows)
    local_rows = int(p.to_local().shape[0]) if p.dim() else 0
    if local_rows != max(0, min(chunk, rows - offset)):
        raise UnsupportedSetupError(
            f"{owner}: the local shard of a parameter of shape {tuple(p.shape)} has {local_rows} rows on mesh "
            f"coordinate {coordinate} of {world}, not torch.chunk's split ({max(0, min(chunk, rows - offset))}); "
            "only FSDP2's even row split is supported."
        )
    return RowSharding(mesh.get_group(), offset, rows, local_rows)


def all_reduce(tensor: torch.Tensor, group: Any, op: str = "sum") -> None:
    """In-place all-reduce of `tensor` over `group` (`op`: "sum" or "max"), through `torch.distributed.all_reduce`
    looked up at call time (so a test can wrap it to count the bytes)."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
