"""Time the projection primitives on the current device: FLoRA's seeded Gaussian projections (the on-device Philox
generator, and the legacy path: drawn on a CPU generator, then moved) and GaLore's refresh (randomized range finder vs exact SVD), plus the last stage of the
range finder two ways: an SVD of the wide (r+p)×n sketch B vs the eigh of its Gram matrix B Bᵀ (what we use). The
range finder runs with the GaLore defaults (`power_iters`, `oversample` = p).

Usage::

    python benchmarks/projection_cost.py                 # CPU
    python benchmarks/projection_cost.py --device cuda   # the legacy path includes the host-to-device copy
    python benchmarks/projection_cost.py --flora-only    # only the two FLoRA generators

Prints the median of `--repeats` timings (ms) per shape, with the torch version and device. Never run in CI.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch

from hf_galore.methods.galore import GaLoreConfig
from hf_galore.projection.random import GENERATOR_PHILOX, GENERATOR_TORCH_CPU, gaussian_projection
from hf_galore.projection.subspace import left_basis

POWER_ITERS, OVERSAMPLE = GaLoreConfig.power_iters, GaLoreConfig.oversample
SHAPES = [(768, 3072, 8), (1024, 2736, 256), (4096, 4096, 128), (4096, 11008, 256), (4096, 11008, 512)]


def _gram_eigh(small: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(small @ small.T)[1]


#: Wall clock by default; `--cpu-time` switches to this process's CPU time (for a shared, oversubscribed machine, where
#: wall time mostly measures waiting for a core).
_CLOCK = [time.perf_counter]


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = _CLOCK[0]()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((_CLOCK[0]() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact", action="store_true", help="Also time the exact SVD (slow on large shapes).")
    parser.add_argument("--flora-only", action="store_true", help="Only FLoRA's projection generators.")
    parser.add_argument("--cpu-time", action="store_true", help="Time CPU seconds of one thread, not wall time.")
    args = parser.parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
        _CLOCK[0] = time.process_time
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, device {args.device}, {platform.processor() or platform.machine()}, {threads} threads"
    )
    if args.flora_only:
        return _flora_only(args)
    print(
        f"| m × n | r | FLoRA n×r, CPU generator + copy (ms) | FLoRA n×r, Philox on device (ms) | randomized refresh, q={POWER_ITERS}, p={OVERSAMPLE} (ms) "
        "| exact SVD (ms) "
        "| last stage: SVD of B (ms) | last stage: eigh of B Bᵀ (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m, n, r in SHAPES:
        flora_legacy = _median_ms(
            partial(gaussian_projection, 0, n, r, device, torch.float32, GENERATOR_TORCH_CPU),
            args.repeats,
            args.device,
        )
        grad = torch.randn(m, n, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        flora = _median_ms(
            partial(gaussian_projection, 0, n, r, device, torch.float32, GENERATOR_PHILOX), args.repeats, args.device
        )
        refresh = partial(left_basis, grad, r, "randomized", POWER_ITERS, OVERSAMPLE, generator)
        randomized = _median_ms(refresh, args.repeats, args.device)
        exact = _median_ms(partial(left_basis, grad, r, "exact"), 1, args.device) if args.exact else float("nan")
        small = torch.randn(r + OVERSAMPLE, n, device=device)
        small_svd = _median_ms(partial(torch.linalg.svd, small, full_matrices=False), args.repeats, args.device)
        gram_eigh = _median_ms(partial(_gram_eigh, small), args.repeats, args.device)
        print(
            f"| {m} × {n} | {r} | {flora_legacy:.2f} | {flora:.2f} | {randomized:.1f} | {exact:.0f} | {small_svd:.1f} | {gram_eigh:.1f} |"
        )
    return 0


def _flora_only(args: argparse.Namespace) -> int:
    """FLoRA's two generators on every shape: the legacy CPU draw (+ copy) and Philox on the device."""
    print("| n × r | CPU generator + copy (ms) | Philox on device (ms) | ratio |")
    print("|---|---|---|---|")
    for _, n, r in SHAPES:
        times = [
            _median_ms(partial(gaussian_projection, 0, n, r, args.device, torch.float32, g), args.repeats, args.device)
            for g in (GENERATOR_TORCH_CPU, GENERATOR_PHILOX)
        ]
        print(f"| {n} × {r} | {times[0]:.2f} | {times[1]:.2f} | {times[1] / times[0]:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
