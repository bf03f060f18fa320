"""Step time, refresh time and optimizer-state bytes of hf_galore optimizers vs (fused) AdamW, side by side.

Every method runs in its own subprocess on the same model config, random tokens and seed, so one method's
allocator state or warm caches cannot flatter another. Results are printed as a markdown table with ratios to the
AdamW baseline of the same invocation, plus JSON (``--json PATH``).

Usage::

    python benchmarks/step_time.py --model llama-60m --device cuda --dtype bf16 --rank 128
    python benchmarks/step_time.py --model tiny --device cpu --steps 20          # smoke run on CPU

One case from the command line; `run.py` runs whole suites (two runs per method) and writes the docs table.
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
from pathlib import Path
from typing import Any

# baselines.py sits next to this script; the hf_galore measured is the one of this checkout, installed or not.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import baselines  # noqa: E402

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
    "llama-7b": {"family": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
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
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype on the target device: a 7B model never exists in fp32
    try:
        with torch.device(device):
            if family == "llama":
                model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=2048))
            else:
                model = RobertaForMaskedLM(RobertaConfig(**spec, max_position_embeddings=514))
    finally:
        torch.set_default_dtype(previous)
    return model


def _build_optimizer(method: str, model: Any, args: argparse.Namespace):
    """hf_galore's optimizer `method`, or a baseline of `baselines.py`, over the same all-linear targets."""
    import hf_galore
    from hf_galore.builder import make_optimizer_kwargs
    from hf_galore.targeting import resolve_target_modules

    if method in baselines.PACKAGES:
        targets = resolve_target_modules(model, "all-linear").weights()
        return baselines.build_baseline(
            method, model, targets, rank=args.rank, gap=args.gap, scale=args.scale, lr=args.lr, device=args.device
        )
    spec = hf_galore.get_spec(method)
    options = {"rank": args.rank, "scale": args.scale} if spec.method != "FLoRA" else {"rank": args.rank}
    options["kappa" if spec.method == "FLoRA" else "update_proj_gap"] = args.gap
    cls, kwargs = make_optimizer_kwargs(
        method, model, lr=args.lr, weight_decay=0.0, target_modules="all-linear", optim_args=options
    )
    return cls(**kwargs)


def run_single(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this process: every step's time, the optimizer-state bytes and the peak memory."""
    import contextlib

    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = args.device
    model = _build_model(args.model, device, dtype)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = _build_optimizer(args.single, model, args)
    layerwise = hasattr(optimizer, "remove_hooks")
    generator = torch.Generator().manual_seed(0)
    vocab = MODELS[args.model]["vocab_size"]
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if args.autocast == "bf16"
        else contextlib.nullcontext()
    )

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step_times, optimizer_times = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        with autocast:
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
    from hf_galore.memory import optimizer_state_bytes

    state = optimizer_state_bytes(optimizer)  # Q-GaLore's INT8 weights excluded; galore-torch's projectors counted
    return {
        "method": args.single,
        "step_times_s": step_times,
        "median_step_s": statistics.median(steady),
        "median_optimizer_step_s": statistics.median(optimizer_times[1:]) if not layerwise else None,
        "first_step_s": step_times[0],
        "optimizer_state_bytes": state,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        **_predicted(args),
    }


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
    if args.single in baselines.PACKAGES and args.single != "adamw":
        return {"predicted_state_bytes": None, "predicted_peak_bytes": None}  # the estimator models hf_galore only
    optim = "adamw_torch" if args.single == "adamw" else args.single
    try:
        estimate = estimate_memory(
            config,
            optim,
            rank=args.rank,
            batch=args.batch,
            seq=args.seq,
            dtype=args.dtype,
            grad_checkpointing=args.grad_checkpointing,
        )
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
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        ratio = f"{r['median_step_s'] / base['median_step_s']:.2f}" if base and "error" not in base else "-"
        peak = f"{r['peak_allocated_bytes'] / 2**20:.0f}" if r["peak_allocated_bytes"] else "-"
        lines.append(
            f"| {r['method']} | {r['median_step_s'] * 1e3:.1f} | {ratio} | {r['first_step_s'] * 1e3:.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:.1f} | {mib(r.get('predicted_state_bytes'))} | {peak} | "
            f"{mib(r.get('predicted_peak_bytes')) if r['peak_allocated_bytes'] else '-'} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument(
        "--methods", nargs="+", default=METHODS, help=f"hf_galore names or {sorted(baselines.PACKAGES)}"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="Weight dtype.")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none", help="Autocast the forward pass.")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--gap", type=int, default=200, help="update_proj_gap / FLoRA's kappa (> --steps: one refresh)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="Also write the results and environment to this file.")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return parser


def run_in_subprocess(argv: list[str], method: str, timeout: float | None = None) -> dict[str, Any]:
    """`run_single` for `method` in a fresh interpreter; a failure is returned as `{"method", "error"}`."""
    command = [sys.executable, __file__, *argv, "--single", method]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f} s"}
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        return {"method": method, "error": lines[-1] if lines else f"exit code {completed.returncode}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.single:
        print(json.dumps(run_single(args)))
        return 0
    results = [run_in_subprocess(argv, method) for method in args.methods]
    environment = _environment(args.device)
    print(f"model={args.model} rank={args.rank} batch={args.batch}x{args.seq} dtype={args.dtype} {environment}")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": vars(args), "environment": environment, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
