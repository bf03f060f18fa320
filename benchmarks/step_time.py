"""Step time, refresh time and optimizer-state bytes of hf_galore optimizers vs (fused) AdamW, side by side.

Every method runs in its own subprocess on the same model config, random tokens and seed, so one method's
allocator state or warm caches cannot flatter another. Results are printed as a markdown table with ratios to the
AdamW baseline of the same invocation, plus JSON (``--json PATH``).

Usage::

    python benchmarks/step_time.py --model llama-60m --device cuda --dtype bf16 --rank 128
    python benchmarks/step_time.py --model tiny --device cpu --steps 20          # smoke run on CPU

This is a first harness for GaLore; the performance issue extends it (published baselines, memory estimator).
Benchmarks never run in CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    # LLaMA shapes from the GaLore paper's pre-training configs; RoBERTa-base as in the GLUE experiments.
    "tiny": {"family": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 512},
    "llama-60m": {"family": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                  "num_attention_heads": 8, "vocab_size": 32000},
    "llama-350m": {"family": "llama", "hidden_size": 1024, "intermediate_size": 2736, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "vocab_size": 32000},
    "llama-1b": {"family": "llama", "hidden_size": 2048, "intermediate_size": 5461, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "vocab_size": 32000},
    "roberta-base": {"family": "roberta", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "vocab_size": 50265},
}  # fmt: skip

METHODS = [
    "adamw",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "q_galore_adamw_8bit",
]


def _build_model(name: str, device: str, dtype: Any):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM

    spec = dict(MODELS[name])
    family = spec.pop("family")
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=2048))
    else:
        model = RobertaForMaskedLM(RobertaConfig(**spec, max_position_embeddings=514))
    return model.to(device=device, dtype=dtype)


def _build_optimizer(method: str, model: Any, rank: int, gap: int, device: str):
    import torch

    import hf_galore

    if method == "adamw":
        fused = device.startswith("cuda")
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    spec = hf_galore.get_spec(method)
    if spec.prepare_model is not None:  # model surgery first (Q-GaLore's INT8 Linears), default knobs
        spec.prepare_model(model, "all-linear", [])
        groups = spec.build_groups(model, "all-linear", weight_decay=0.0, configs=[])
    else:
        groups = hf_galore.build_param_groups(model, "all-linear", weight_decay=0.0)
    cls = spec.optimizer_cls
    return cls(groups, lr=1e-4, rank=rank, update_proj_gap=gap, scale=0.25)


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this process."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = args.device
    model = _build_model(args.model, device, dtype)
    optimizer = _build_optimizer(args.single, model, args.rank, args.gap, device)
    layerwise = hasattr(optimizer, "remove_hooks")
    generator = torch.Generator().manual_seed(0)
    vocab = MODELS[args.model]["vocab_size"]
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step_times, optimizer_times = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        sync()
        after_backward = time.perf_counter()
        optimizer.step()
        if not layerwise:
            optimizer.zero_grad(set_to_none=True)
        sync()
        end = time.perf_counter()
        step_times.append(end - start)
        optimizer_times.append(end - after_backward)
    # Step 0 refreshes every basis (and warms up kernels); steady-state statistics skip it.
    steady = step_times[1:]
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for k, v in s.items()
        # Q-GaLore's state references the model's INT8 weights (its master copy): they are weights, not state.
        if isinstance(v, torch.Tensor) and k not in ("weight_q", "weight_scales", "weight_zeros")
    )
    result = {
        "method": args.single,
        "median_step_s": statistics.median(steady),
        "median_optimizer_step_s": statistics.median(optimizer_times[1:]) if not layerwise else None,
        "first_step_s": step_times[0],
        "optimizer_state_bytes": state_bytes,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        **_predicted(args),
    }
    return result


def _predicted(args: argparse.Namespace) -> dict[str, Any]:
    """hf_galore.memory's prediction for this run, printed next to the measurement (None when not estimable)."""
    from transformers import LlamaConfig, RobertaConfig

    from hf_galore.memory import estimate_memory

    spec = dict(MODELS[args.model])
    family = spec.pop("family")
    if family == "llama":
        config = LlamaConfig(**spec, max_position_embeddings=2048, architectures=["LlamaForCausalLM"])
    else:
        config = RobertaConfig(**spec, max_position_embeddings=514, architectures=["RobertaForMaskedLM"])
    optim = "adamw_torch" if args.single == "adamw" else args.single
    try:
        estimate = estimate_memory(config, optim, rank=args.rank, batch=args.batch, seq=args.seq, dtype=args.dtype)
    except Exception as exc:  # noqa: BLE001 - a method the estimator does not model must not break the benchmark
        print(f"no memory prediction for {optim}: {exc}", file=sys.stderr)
        return {"predicted_state_bytes": None, "predicted_peak_bytes": None}
    return {"predicted_state_bytes": estimate.state_bytes, "predicted_peak_bytes": estimate.total_peak}


def _environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["method"] == "adamw"), None)
    lines = [
        "| method | median step (ms) | × AdamW | first step incl. refresh (ms) | optimizer state (MiB) "
        "| predicted state (MiB) | peak (MiB) | predicted peak (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def mib(value: int | None) -> str:
        return f"{value / 2**20:.1f}" if value is not None else "-"

    for r in results:
        ratio = f"{r['median_step_s'] / base['median_step_s']:.2f}" if base else "-"
        peak = f"{r['peak_allocated_bytes'] / 2**20:.0f}" if r["peak_allocated_bytes"] else "-"
        lines.append(
            f"| {r['method']} | {r['median_step_s'] * 1e3:.1f} | {ratio} | {r['first_step_s'] * 1e3:.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:.1f} | {mib(r.get('predicted_state_bytes'))} | {peak} | "
            f"{mib(r.get('predicted_peak_bytes')) if r['peak_allocated_bytes'] else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap (larger than --steps: one refresh)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="Also write the results and environment to this file.")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(run_single(args)))
        return 0
    results = []
    for method in args.methods:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--single", method]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    environment = _environment(args.device)
    print(f"model={args.model} rank={args.rank} batch={args.batch}x{args.seq} dtype={args.dtype} {environment}")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "environment": environment, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
