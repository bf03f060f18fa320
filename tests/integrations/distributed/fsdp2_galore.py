"""Train a tiny MLP with GaLoreAdamW(8bit), or WeLoreAdamW(8bit) on its WeLore split, under FSDP2 (`fully_shard`,
gloo, CPU) or in one process; launched by tests/integrations/test_fsdp2.py (one process: the unsharded reference;
two: `torch.distributed.run`).

A plain loop (the Trainer does not apply FSDP on CPU). Each rank takes its half of the step's batch, so two processes
see together exactly the one-process batch; FSDP2 averages the gradients over the ranks, as the one-process mean does.

Writes, per rank, `rank{R}.pt`: per-step losses (averaged over the ranks), the final parameters (`full_tensor()`),
the bases after every refresh, the optimizer's collectives per step (wrapped `torch.distributed` functions, counted
only inside `optimizer.step()`), the optimizer state bytes held by the rank, and, with `--refusals`, the messages of
the setups refused before the first step.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from hf_galore import (
    FloraAdafactor,
    FloraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamWLayerwise,
    welore,
)
from hf_galore.errors import UnsupportedSetupError
from hf_galore.methods.welore import WeLoreAdamW, WeLoreAdamW8bit
from hf_galore.modules.low_rank_linear import LowRankLinear

OPTIMIZERS = {"galore_adamw": GaLoreAdamW, "galore_adamw_8bit": GaLoreAdamW8bit, "welore_adamw": WeLoreAdamW,
              "welore_adamw_8bit": WeLoreAdamW8bit, "flora_adamw": FloraAdamW}  # fmt: skip
OPTIMIZERS.update(galore_adafactor=GaLoreAdafactor, flora_adafactor=FloraAdafactor)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter")  # fmt: skip


#: `(step, parameter, global row)` of the NaNs `--nan` puts in a gradient: rows rank 1 holds under two processes, at
#: an ordinary step and at a refresh step (refreshes at steps 0, 3, 6): every process must skip that weight's update.
NANS = ((4, "3.weight", 20), (6, "0.weight", 40))


def put_nan(p: torch.Tensor, row: int, rank: int, world: int) -> None:
    """Set element `[row, 0]` of `p.grad` (global row index) on the process that holds that row."""
    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
    offset = rank * -(-p.shape[0] // world)
    if offset <= row < offset + grad.shape[0]:
        grad[row - offset, 0] = float("nan")


def build_model(dtype: torch.dtype) -> nn.Sequential:
    """Weights 64×24 (tall), 32×64 and 9×32 (wide: `std` would project them on the left in one process); the last
    one's 9 rows split unevenly (5 + 4) over two processes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 64), nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 9)
    )
    return model.to(dtype)


def param_groups(model: nn.Module) -> list[dict]:
    if any(isinstance(m, LowRankLinear) for m in model.modules()):  # WeLore: its trainable set, nothing projected
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    weights = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": others}, {"params": weights, "low_rank": True}]


class CollectiveCounter:
    """Wraps the `torch.distributed` collectives; records `(name, numel)` of each call while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, int]] = []
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                if self.active:
                    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                    lists = [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                    self.calls.append((_name, sum(t.numel() for t in tensors + lists)))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)


def refusals(model: nn.Module, optim_kwargs: dict, flora: bool = False) -> dict[str, str]:
    """Setups refused at construction (before any step), by label: the error message, or "" if not refused."""
    if flora:
        cases = {"flora_left": (FloraAdamW, {"proj_type": "left"}), "flora_adafactor": (FloraAdafactor, {})}
    else:
        cases = {
            "left": (GaLoreAdamW, {"proj_type": "left"}),
            "full": (GaLoreAdamW, {"proj_type": "full"}),
            "reverse_std": (GaLoreAdamW, {"proj_type": "reverse_std"}),  # left on the tall 64×24 weight
            "exact": (GaLoreAdamW, {"svd": "exact"}),
            "adafactor": (GaLoreAdafactor, {}),
            "layerwise": (GaLoreAdamWLayerwise, {}),
        }
    messages = {}
    for label, (cls, extra) in cases.items():
        kwargs = {**optim_kwargs, **extra}
        if cls is GaLoreAdafactor:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("weight_decay",)}
        if cls is FloraAdafactor:
            kwargs = {k: v for k, v in kwargs.items() if k in ("rank", "kappa", "proj_type")}
        try:
            cls(param_groups(model), **kwargs)
            messages[label] = ""
        except UnsupportedSetupError as err:
            messages[label] = str(err)
    return messages


def state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer's state tensors on this rank: bases (`proj_*`) and everything else (moments)."""
    out = {"bases": 0, "moments": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out["bases" if key.startswith("proj_") else "moments"] += value.numel() * value.element_size()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", required=True, choices=sorted(OPTIMIZERS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--proj-type", default="std")
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--refusals", action="store_true")
    parser.add_argument("--min-8bit-size", type=int, default=0)
    parser.add_argument("--nan", action="store_true", help="Put a NaN in a gradient row that rank 1 holds (see NANS).")
    parser.add_argument("--no-foreach", action="store_true", help="The per-parameter path instead of the batched one.")
    parser.add_argument("--extra", default="{}", help='More optimizer kwargs as JSON, e.g. {"power_iters": 2}.')
    parser.add_argument(
        "--reload-at",
        type=int,
        default=-1,
        help="After this step, continue with a new optimizer "
        "loaded from the state_dict (saved and loaded with weights_only=True) of this process.",
    )
    parser.add_argument("--chunk-elements", type=int, default=0, help="Override foreach_chunk_elements (0: keep).")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dtype = torch.float64 if args.float64 else torch.float32
    model = build_model(dtype)
    if args.optim.startswith("welore"):
        # The split comes before fully_shard (the same SVDs of the same weights on every process): the LRC factors
        # 9×24 + 64×9, 10×64 + 32×10, 4×32 + 9×4 (9-row ones split 5 + 4) train; biases and norm frozen.
        welore.compress(model, target_compression=0.5)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    counter = CollectiveCounter()

    optim_kwargs = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "update_proj_gap": 3, "scale": 1.0,
                    "oversample": 4, "proj_type": args.proj_type}  # fmt: skip
    if args.optim.startswith("welore"):  # projects nothing: no projection knobs
        optim_kwargs = {"lr": 1e-2, "weight_decay": 0.01}
    if args.optim in ("flora_adamw", "flora_adafactor"):  # resamples the momentum projection at steps 3 and 6
        optim_kwargs = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "kappa": 3, "proj_type": args.proj_type}
    optim_kwargs.update(json.loads(args.extra))
    if args.no_foreach:
        optim_kwargs["foreach"] = False
    if args.chunk_elements:  # several chunks per step: one non-finite check (a collective) per chunk
        OPTIMIZERS[args.optim].foreach_chunk_elements = args.chunk_elements
    if args.optim.endswith("_8bit"):
        optim_kwargs.update(min_8bit_size=args.min_8bit_size, block_size=64)
    refused = refusals(model, optim_kwargs, flora=args.optim == "flora_adamw") if args.refusals else {}
    optimizer = OPTIMIZERS[args.optim](param_groups(model), **optim_kwargs)
    names = {id(p): n for n, p in model.named_parameters()}

    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.steps, args.global_batch, 6, 24, generator=data, dtype=dtype)
    targets = torch.randn(args.steps, args.global_batch, 6, 9, generator=data, dtype=dtype)
    per_rank = args.global_batch // world
    losses, collectives, refreshed, bases = [], [], [], {}
    for step in range(args.steps):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = nn.functional.mse_loss(model(inputs[step, rows]), targets[step, rows])
        loss.backward()
        for nan_step, name, row in NANS if args.nan else ():
            if nan_step == step:
                put_nan(dict(model.named_parameters())[name], row, rank, world)
        before = {id(p): s.get("refresh_count", 0) for p, s in optimizer.state.items()}
        counter.calls = []
        counter.active = True
        optimizer.step()
        counter.active = False
        collectives.append(counter.calls)
        optimizer.zero_grad()
        if step == args.reload_at:  # resume on the same number of processes: each process its own shards
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            optimizer = OPTIMIZERS[args.optim](param_groups(model), **optim_kwargs)
            optimizer.load_state_dict(saved)
        refreshed.append(False)
        for p, state in optimizer.state.items():
            if state.get("refresh_count", 0) != before.get(id(p), 0):
                refreshed[-1] = True
                basis = state["proj_right"] if "proj_right" in state else state["proj_right_q"].float()  # basis_bits
                bases[f"{names[id(p)]}@{step}"] = basis.detach().clone()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses.append(float(logged))

    params = {}
    for name, p in model.named_parameters():
        params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    torch.save(
        {
            "losses": losses,
            "params": params,
            "bases": bases,
            "collectives": collectives,
            "refreshed": refreshed,
            "state_bytes": state_bytes(optimizer),
            "sides": {names[id(p)]: s["side"] for p, s in optimizer.state.items() if "side" in s},
            "skips": {names[id(p)]: s.get("nonfinite_skips", 0) for p, s in optimizer.state.items()},
            "steps": {names[id(p)]: s["step"] for p, s in optimizer.state.items()},
            "refusals": refused,
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
