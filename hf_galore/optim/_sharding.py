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


def chunk_split(total: int, world: int) -> list[tuple[int, int]]:
    """`(offset, size)` of each process' part when `total` items are split over `world` processes as `torch.chunk`
    (and so FSDP2 and DTensor's `Shard(0)`) splits them: ceil(total / world) each, the last ones shorter or empty."""
    chunk = math.ceil(total / world) if total else 0
    return [(min(k * chunk, total), max(0, min(chunk, total - k * chunk))) for k in range(world)]


def row_dtensor(local: torch.Tensor, like: torch.Tensor, rows: int) -> torch.Tensor:
    """`local` (this process' rows of a tensor whose first dimension has `rows` rows globally) as a DTensor sharded
    like the parameter `like` (`Shard(0)` on its mesh), with the global shape; shares `local`'s storage.

    The global shape and stride are given, not inferred by communication, so `state_dict()` stays collective-free;
    `torch.distributed.checkpoint` then writes each process' rows at their global offset and reads any other split.
    """
    shape = (rows, *local.shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return DTensor.from_local(local, like.device_mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def rows_of(value: torch.Tensor, sharding: RowSharding, key: str) -> torch.Tensor:
    """This process' rows of a saved state tensor that follows the parameter's rows: the local part of a DTensor,
    a slice of a full (global-shape) tensor, or the tensor itself when it already holds just these rows (what
    `state_dict()` wrote per process before states were DTensors).

    Raises:
        ValueError: when the tensor has neither the global nor this process' row count.
    """
    if is_dtensor(value):
        if int(value.shape[0]) != sharding.rows:
            raise ValueError(
                f"optimizer state {key!r} of a row-sharded parameter with {sharding.rows} rows was saved with "
                f"{int(value.shape[0])} rows."
            )
        local = value.to_local()
        if int(local.shape[0]) == sharding.local_rows:
            return local
        value = value.full_tensor()  # another split of the same rows: gather, then take this process' rows
    rows = int(value.shape[0]) if value.dim() else -1
    if rows == sharding.rows:
        return value[sharding.offset : sharding.offset + sharding.local_rows]
    if rows == sharding.local_rows:
        return value
    raise ValueError(
        f"optimizer state {key!r} of a row-sharded parameter ({sharding.rows} rows, {sharding.local_rows} on this "
        f"process) has shape {tuple(value.shape)}: neither the whole tensor nor this process' rows."
    )
