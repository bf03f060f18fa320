"""Data parallel without DDP's reducer where the ranks use different weights (a two-"expert" toy): launched by
tests/integrations/test_distributed.py.

Rank 0 uses weights `a` and `b`, rank 1 only `b`. The weights are reduced by the layer-wise optimizer itself
(default), or with `--backward-all-reduce` by a `BackwardAllReduce` at the end of backward for a plain optimizer
(as `q_galore_adamw_8bit` reduces its carriers). Each rank writes `rank{R}.pt` with its result and a one-process
reference fed the mean of the two ranks' losses.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from hf_galore.methods.galore import GaLoreAdamW, GaLoreAdamWLayerwise
from hf_galore.optim.allreduce import BackwardAllReduce


def losses(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    return [(a @ x.T).sin().sum() + (b @ x.T).pow(2).sum(), (b @ x.T).pow(2).sum()]


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # float64: the two-process and one-process sums differ only by round-off, far below the test's tolerance.
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    a0, b0 = torch.randn(16, 32), torch.randn(16, 32)
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    ra, rb = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    kwargs = dict(lr=1e-2, rank=4, update_proj_gap=2)
    if "--backward-all-reduce" in sys.argv:
        optimizer = GaLoreAdamW([{"params": [a, b], "low_rank": True}], **kwargs)
        reduction = BackwardAllReduce([a, b])  # noqa: F841 - its hooks hold it weakly: keep it alive
    else:
        optimizer = GaLoreAdamWLayerwise([{"params": [a, b], "low_rank": True}], **kwargs)
    reference = GaLoreAdamW([{"params": [ra, rb], "low_rank": True}], **kwargs)
    for step in range(4):  # refreshes at steps 0 and 2, projected all-reduce at steps 1 and 3
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        losses(a, b, x)[rank].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        (sum(losses(ra, rb, x)) / 2).backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
    torch.save({"a": a.detach(), "b": b.detach(), "ra": ra.detach(), "rb": rb.detach()},
               os.path.join(sys.argv[sys.argv.index("--out") + 1], f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
