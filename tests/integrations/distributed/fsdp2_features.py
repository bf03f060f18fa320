"""Global gradient clipping and FSDP2's `MixedPrecisionPolicy` with GaLoreAdamW / FloraAdamW on `fully_shard` row
shards (gloo, CPU), or the one-process reference; launched by tests/integrations/test_fsdp2_features.py.

The model, its parameter groups and the data layout are fsdp2_galore.py's (each rank takes its half of the step's
batch). Two features on top:

* `--clip MAX_NORM`: `torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)` before `optimizer.step()`. On
  FSDP2 the gradients are DTensors, so the norm is reduced over every process' rows (a global norm) and returned as a
  DTensor; the rank records its `full_tensor()`.
* `--mp bf16-fp32` / `--mp bf16`: `fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
  reduce_dtype=torch.float32 / None))`: the forward and backward run on bf16 copies of the all-gathered weights, the
  gradients are reduce-scattered in fp32 (`bf16-fp32`) or bf16 (`bf16`, FSDP2's default `reduce_dtype=None` means
  the param dtype), and the optimizer keeps fp32 sharded parameters and receives fp32 sharded gradients either way.
  The one-process reference (`--parts 2`) does the same arithmetic without FSDP: each part of the batch (one per
  process of the sharded run) runs forward and backward on a bf16 copy of the fp32 weights, and the parts' bf16
  gradients are averaged in the reduce dtype and handed to the fp32 parameters.

Writes `rank{R}.pt`: per-step losses (averaged over ranks/parts), the total gradient norms `clip_grad_norm_` returned,
the final parameters, the bases after every refresh, and the dtypes the optimizer saw (parameters, gradients, state).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from fsdp2_galore import build_model, param_groups, state_bytes
from torch import nn

from hf_galore import FloraAdamW, GaLoreAdamW

OPTIMIZERS = {"galore_adamw": GaLoreAdamW, "flora_adamw": FloraAdamW}
#: `--mp` -> FSDP2's reduce dtype (None: the param dtype, bf16); "fp32" means no MixedPrecisionPolicy.
REDUCE_DTYPES = {"bf16-fp32": torch.float32, "bf16": None}


def dtypes_seen(optimizer: torch.optim.Optimizer) -> dict[str, list[str]]:
    """The dtypes of the (local) parameters, gradients and state tensors the optimizer holds, by kind."""
    seen: dict[str, set[str]] = {"params": set(), "grads": set(), "moments": set(), "bases": set()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen["params"].add(str(p.dtype))
            if p.grad is not None:
                seen["grads"].add(str(p.grad.dtype))
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    seen["bases" if key.startswith("proj_") else "moments"].add(str(value.dtype))
    return {kind: sorted(values) for kind, values in seen.items()}


def reference_mixed_precision_grads(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, parts: int, reduce_dtype: torch.dtype | None
) -> float:
    """What FSDP2's bf16 mixed precision computes on `parts` processes, in one process; returns the mean loss.

    Each part runs on a bf16 copy of the fp32 weights (FSDP2 casts the all-gathered weights, and with
    `cast_forward_inputs` the inputs, to `param_dtype`); its bf16 gradients are cast to the reduce dtype, averaged
    over the parts in that dtype (a two-term sum and a division by 2 are correctly rounded, as gloo's reduction is)
    and stored, in fp32, as the fp32 parameters' gradients.
    """
    shadow = copy.deepcopy(model).to(torch.bfloat16)
    reduce_dtype = reduce_dtype or torch.bfloat16
    total: dict[str, torch.Tensor] = {}
    losses = []
    for x, y in zip(inputs.chunk(parts), targets.chunk(parts)):
        shadow.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(shadow(x.to(torch.bfloat16)).float(), y)
        loss.backward()
        losses.append(float(loss))
        for name, p in shadow.named_parameters():
            grad = p.grad.to(reduce_dtype)
            total[name] = grad if name not in total else total[name] + grad
    for name, p in model.named_parameters():
        p.grad = (total[name] / parts).float()
    return sum(losses) / parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", required=True, choices=sorted(OPTIMIZERS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--proj-type", default="std")
    parser.add_argument("--clip", type=float, default=0.0, help="max_norm of clip_grad_norm_ (0: no clipping).")
    parser.add_argument(
        "--local-clip",
        action="store_true",
        help="The mistake the test must catch: each process clips its own rows by their own norm.",
    )
    parser.add_argument("--mp", default="fp32", choices=["fp32", *REDUCE_DTYPES])
    parser.add_argument("--parts", type=int, default=2, help="One process under --mp: emulate this many processes.")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = build_model(torch.float32)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        kwargs = {}
        if args.mp != "fp32":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=REDUCE_DTYPES[args.mp])
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh, **kwargs)
        fully_shard(model, mesh=mesh, **kwargs)

    if args.optim == "flora_adamw":  # resamples the momentum projection at steps 3 and 6
        optim_kwargs = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "kappa": 3, "proj_type": args.proj_type}
    else:  # refreshes at steps 0, 3, 6
        optim_kwargs = {"lr": 1e-2, "weight_decay": 0.01, "rank": 4, "update_proj_gap": 3, "scale": 1.0,
                        "oversample": 4, "proj_type": args.proj_type}  # fmt: skip
    optimizer = OPTIMIZERS[args.optim](param_groups(model), **optim_kwargs)
    names = {id(p): n for n, p in model.named_parameters()}

    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(args.steps, args.global_batch, 6, 24, generator=data)
    targets = torch.randn(args.steps, args.global_batch, 6, 9, generator=data)
    per_rank = args.global_batch // world
    losses, norms, bases, dtypes, output_dtypes = [], [], {}, {}, set()
    for step in range(args.steps):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        if world == 1 and args.mp != "fp32":
            losses.append(reference_mixed_precision_grads(model, inputs[step], targets[step], args.parts,
                                                          REDUCE_DTYPES[args.mp]))  # fmt: skip
        else:
            output = model(inputs[step, rows])
            output_dtypes.add(str(output.dtype))
            loss = nn.functional.mse_loss(output.float(), targets[step, rows])
            loss.backward()
            logged = loss.detach().clone()
            if world > 1:
                dist.all_reduce(logged)
                logged /= world
            losses.append(float(logged))
        if args.clip and args.local_clip:
            local = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in local]))
            torch._foreach_mul_(local, torch.clamp(args.clip / (norm + 1e-6), max=1.0))
            norms.append(float(norm))
        elif args.clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        before = {id(p): s.get("refresh_count", 0) for p, s in optimizer.state.items()}
        if step == 0:
            dtypes["grads"] = dtypes_seen(optimizer)["grads"]
        optimizer.step()
        for p, state in optimizer.state.items():
            if "proj_right" in state and state.get("refresh_count", 0) != before.get(id(p), 0):
                bases[f"{names[id(p)]}@{step}"] = state["proj_right"].detach().clone()
        optimizer.zero_grad()

    dtypes.update({k: v for k, v in dtypes_seen(optimizer).items() if k != "grads"})
    params = {}
    for name, p in model.named_parameters():
        params[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    torch.save(
        {
            "losses": losses,
            "norms": norms,
            "params": params,
            "bases": bases,
            "dtypes": dtypes,
            "output_dtypes": sorted(output_dtypes),
            "state_bytes": state_bytes(optimizer),
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
