"""Optimizer step alone: the batched path (`foreach=True`) against the per-parameter loop, side by side.

Both variants of each method are built on identical models with identical random gradients in one process, and
their steps are timed in alternation (round-robin), so drift of the machine affects both alike. Step 0 (the
refresh) is excluded; the gap is larger than the run, so every timed step is a steady one. Output: a markdown table
of median step times and the ratio per-parameter / batched, plus JSON (``--json PATH``).

Usage::

    python benchmarks/optimizer_step.py --model llama-60m --device cpu
    python benchmarks/optimizer_step.py --model llama-350m --width-divisor 16 --device cpu   # host overhead
    python benchmarks/optimizer_step.py --model llama-350m --device cuda --dtype bf16 --rank 256

`--width-divisor D` divides the hidden and intermediate sizes by D and keeps the layer count, so the parameter
count and the number of kernel launches stay those of the full model while the arithmetic nearly vanishes: the
step time is then the host-side cost (Python, dispatch, launches), the part a GPU cannot hide when its kernels are
short. Benchmarks never run in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from step_time import MODELS, _environment  # noqa: E402

METHODS = ["adamw_torch", "galore_adamw", "galore_adamw_8bit", "q_galore_adamw_8bit", "flora_adamw"]


def build_model(name: str, width_divisor: int, device: str, dtype: Any):
    """The benchmark model `name`, with hidden/intermediate sizes divided by `width_divisor` (heads kept ≥ 1)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM

    spec = dict(MODELS[name])
    family = spec.pop("family")
    if width_divisor > 1:
        heads = max(1, spec["num_attention_heads"] // width_divisor)
        head_dim = max(1, spec["hidden_size"] // spec["num_attention_heads"])
        spec.update(
            hidden_size=heads * head_dim,
            num_attention_heads=heads,
            intermediate_size=max(1, spec["intermediate_size"] // width_divisor),
        )
    torch.manual_seed(0)
    with torch.device(device):
        if family == "llama":
            model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=2048))
        else:
            model = RobertaForMaskedLM(RobertaConfig(**spec, max_position_embeddings=514))
    return model.to(dtype)


def build_optimizer(method: str, model: Any, foreach: bool, rank: int, steps: int):
    """`method` over all-linear targets with `foreach`; `adamw_torch` is `torch.optim.AdamW(foreach=...)`."""
    import torch

    from hf_galore.builder import make_optimizer_kwargs

    if method == "adamw_torch":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=foreach)
    gap = "kappa" if method.startswith("flora") else "update_proj_gap"
    options = {"rank": rank, gap: steps + 10, "foreach": foreach}
    cls, kwargs = make_optimizer_kwargs(
        method, model, lr=1e-4, weight_decay=0.0, target_modules="all-linear", optim_args=options
    )
    return cls(**kwargs)


def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    variants = {}
    for foreach in (False, True):
        model = build_model(args.model, args.width_divisor, args.device, dtype)
        optimizer = build_optimizer(method, model, foreach, args.rank, args.steps)
        generator = torch.Generator(device=args.device).manual_seed(0)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, device=args.device, dtype=p.dtype)
        variants[foreach] = (optimizer, [])

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for step in range(args.steps + 1):
        for optimizer, times in variants.values():
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            if step > 0:  # step 0 computes every basis
                times.append(time.perf_counter() - start)
    per_param, batched = (statistics.median(variants[f][1]) for f in (False, True))
    return {"method": method, "per_parameter_s": per_param, "batched_s": batched, "speedup": per_param / batched}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-60m", choices=sorted(MODELS))
    parser.add_argument("--width-divisor", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    rows = [measure(method, args) for method in args.methods]
    width = f", widths / {args.width_divisor}" if args.width_divisor > 1 else ""
    print(f"\n{args.model}{width}, {args.dtype}, rank {args.rank}, {args.device}, median of {args.steps} steps")
    print("| method | per-parameter loop | batched (foreach) | speed-up |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['per_parameter_s'] * 1e3:.2f} ms | {row['batched_s'] * 1e3:.2f} ms "
            f"| {row['speedup']:.2f}× |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "env": _environment(args.device), "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
