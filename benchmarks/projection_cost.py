"""Time the projection primitives on the current device: FLoRA's seeded Gaussian projections (drawn on a CPU
generator, then moved) and GaLore's refresh (randomized range finder vs exact SVD).

Usage::

    python benchmarks/projection_cost.py                 # CPU
    python benchmarks/projection_cost.py --device cuda   # includes the host-to-device copy of FLoRA's matrices

Prints the median of `--repeats` timings (ms) per shape, with the torch version and device. Never run in CI.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch

from hf_galore.projection.random import gaussian_projection
from hf_galore.projection.subspace import left_basis

SHAPES = [(768, 3072, 8), (4096, 4096, 128), (4096, 11008, 256)]


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact", action="store_true", help="Also time the exact SVD (slow on large shapes).")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {args.device}, {platform.processor() or platform.machine()}")
    print("| m × n | r | FLoRA projection n×r (ms) | randomized refresh, 1 power iter (ms) | exact SVD (ms) |")
    print("|---|---|---|---|---|")
    for m, n, r in SHAPES:
        grad = torch.randn(m, n, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        flora = _median_ms(partial(gaussian_projection, 0, n, r, device, torch.float32), args.repeats, args.device)
        randomized = _median_ms(partial(left_basis, grad, r, "randomized", 1, 8, generator), args.repeats, args.device)
        exact = _median_ms(partial(left_basis, grad, r, "exact"), 1, args.device) if args.exact else float("nan")
        print(f"| {m} × {n} | {r} | {flora:.2f} | {randomized:.1f} | {exact:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
