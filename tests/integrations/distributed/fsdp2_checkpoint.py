"""Save optimizers through torch.distributed.checkpoint (DCP) on N processes and resume them on M; launched by
tests/integrations/test_fsdp2_checkpoint.py.

The model, data and optimizer settings are those of fsdp2_galore.py (a tiny MLP whose 9-row weight splits 5 + 4 over
two processes; each process takes its half of the global batch). One process trains the plain model, two train it
under `fully_shard` (gloo, CPU). Checkpoints go through the calls accelerate's `save_fsdp_optimizer` /
`load_fsdp_optimizer` make for FSDP2: `get_optimizer_state_dict` (and `get_model_state_dict`) → `dcp.save`; on
resume, the new optimizer's `get_optimizer_state_dict` as the template → `dcp.load` into it →
`set_optimizer_state_dict`. One launch runs several cases (`--cases`, see `CASES`), each with its own model,
optimizer and checkpoint folder, so the tests pay the start-up of a launch once.

* `--save-at K --save-dir D`: after step K, save each case to D/<case>, then go on to the last step (so the same run
  is the uninterrupted reference).
* `--resume-from D --resume-at K`: build the model and optimizer, load D/<case>, and run steps K+1 to the last.

Writes, per rank, `rank{R}.pt`: per case, the losses of the steps it ran, the final parameters (`full_tensor()`), the
per-weight step counters, sides and non-finite skips, and this process' optimizer state right after the save
(`saved`) and right after loading (`loaded`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_galore import NANS, OPTIMIZERS, build_model, param_groups, put_nan

from hf_galore import welore
from hf_galore.optim import check_dcp_checkpoint


def break_resharding() -> None:
    """Make every process load the first process' rows of each row-following state (what a loader that ignores
    the sharding would do): the test's proof that a broken reshard fails its comparison."""
    from hf_galore.optim import adamw, base

    def first_rows(value, sharding, key):
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        return full[: sharding.local_rows] if int(full.shape[0]) == sharding.rows else full

    base.rows_of = adamw.rows_of = first_rows


#: The cases one launch runs, each with its own model, optimizer and checkpoint folder: `(optimizer name, extra kwargs)`.
#: 8-bit with `min_8bit_size=65` (block 64): the 64×4 and 32×4 moments are 8-bit and each shard holds whole blocks
#: ("aligned"); the 1-D states and the 9×4 moments stay fp32. With 0, every state is 8-bit and the 64-element 1-D
#: states (32 + 32 rows) and the 9-row ones (5 + 4) have blocks that straddle the two shards.
CASES = {
    "galore_adamw": ("galore_adamw", {}),
    "galore_adamw_8bit": ("galore_adamw_8bit", {"min_8bit_size": 65, "block_size": 64}),
    "galore_adamw_8bit_straddling": ("galore_adamw_8bit", {"min_8bit_size": 0, "block_size": 64}),
    "flora_adamw": ("flora_adamw", {}),
    "welore_adamw": ("welore_adamw", {}),
    # Adafactor: the column statistics of the 2-D tensors are replicated (all-reduced means over all rows).
    "galore_adafactor": ("galore_adafactor", {}),
    "flora_adafactor": ("flora_adafactor", {}),
    # The full-state-dict API instead of DCP (accelerate's FULL_STATE_DICT): gathered, torch.save'd, loaded whole.
    "galore_adamw_full_state_dict": ("galore_adamw", {}),
    "galore_adamw_8bit_straddling_full_state_dict": ("galore_adamw_8bit", {"min_8bit_size": 0, "block_size": 64}),
}


def build(case: str, proj_type: str, mesh) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The case's model (sharded with `fully_shard` on `mesh` unless None) and its optimizer."""
    name, extra = CASES[case]
    model = build_model(torch.float32)
    if name.startswith("welore"):
        welore.compress(model, target_compression=0.5)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    kwargs = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "update_proj_gap": 3, "scale": 1.0, "oversample": 4,
              "proj_type": proj_type}  # fmt: skip
    if name.startswith("welore"):
        kwargs = {"lr": 1e-2, "weight_decay": 0.01}
    if name in ("flora_adamw", "flora_adafactor"):  # resamples the momentum projection at steps 3 and 6
        kwargs = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "kappa": 3, "proj_type": proj_type}
    return model, OPTIMIZERS[name](param_groups(model), **kwargs, **extra)


def plain_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict]:
    """The optimizer's state by parameter name, tensors copied (this process' rows of sharded ones)."""
    return {
        names[id(p)]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}
        for p, state in optimizer.state.items()
    }


def run_case(case: str, args: argparse.Namespace, mesh, world: int, rank: int) -> dict:
    model, optimizer = build(case, args.proj_type, mesh)
    names = {id(p): n for n, p in model.named_parameters()}
    first, loaded, saved = 0, {}, {}
    full = StateDictOptions(full_state_dict=True) if case.endswith("_full_state_dict") else None
    if args.resume_from and full is not None:  # every process reads the whole state, each keeps its part
        state = torch.load(os.path.join(args.resume_from, f"{case}.pt"), weights_only=True)
        set_model_state_dict(model, state["model"], options=full)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        first, loaded = args.resume_at + 1, plain_state(optimizer, names)
    elif args.resume_from:
        # accelerate's load_fsdp_optimizer: this optimizer's own state dict is the template DCP loads into (after
        # hf_galore's check of the saved sides and shapes, which passes here).
        check_dcp_checkpoint(model, optimizer, os.path.join(args.resume_from, case))
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(args.resume_from, case))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        first, loaded = args.resume_at + 1, plain_state(optimizer, names)

    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.steps, args.global_batch, 6, 24, generator=data)
    targets = torch.randn(args.steps, args.global_batch, 6, 9, generator=data)
    per_rank = args.global_batch // world
    losses = {}
    for step in range(first, args.steps):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = nn.functional.mse_loss(model(inputs[step, rows]), targets[step, rows])
        loss.backward()
        for nan_step, name, row in NANS if args.nan else ():
            if nan_step == step and name in dict(model.named_parameters()):  # WeLore's model has other names
                put_nan(dict(model.named_parameters())[name], row, rank, world)
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses[step] = float(logged)
        if step == args.save_at and full is not None:  # gathered on every process, written by the first
            state = {
                "model": get_model_state_dict(model, options=full),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=full),
            }
            if rank == 0:
                os.makedirs(args.save_dir, exist_ok=True)
                torch.save(state, os.path.join(args.save_dir, f"{case}.pt"))
            if world > 1:
                dist.barrier()
            saved = plain_state(optimizer, names)
        elif step == args.save_at:  # accelerate's save_fsdp_optimizer (with the model's state next to it)
            state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
            dcp.save(state, checkpoint_id=os.path.join(args.save_dir, case))
            saved = plain_state(optimizer, names)

    params = {}
    for name, p in model.named_parameters():
        params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return {
        "losses": losses,
        "params": params,
        "saved": saved,
        "loaded": loaded,
        "sides": {names[id(p)]: s["side"] for p, s in optimizer.state.items() if "side" in s},
        "steps": {names[id(p)]: s["step"] for p, s in optimizer.state.items()},
        "skips": {names[id(p)]: s.get("nonfinite_skips", 0) for p, s in optimizer.state.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help=f"Comma-separated, from {sorted(CASES)}.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--proj-type", default="std")
    parser.add_argument("--nan", action="store_true", help="NaNs in gradient rows rank 1 holds (fsdp2_galore.NANS).")
    parser.add_argument("--save-at", type=int, default=-1)
    parser.add_argument("--save-dir", default="")
    parser.add_argument("--resume-from", default="")
    parser.add_argument("--resume-at", type=int, default=-1)
    parser.add_argument("--break-resharding", action="store_true")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
    if args.break_resharding:
        break_resharding()
    results = {case: run_case(case, args, mesh, world, rank) for case in args.cases.split(",")}
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
