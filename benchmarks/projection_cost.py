"""Time the projection primitives on the current device: FLoRA's seeded Gaussian projections (drawn on a CPU
generator, then moved) and GaLore's refresh (randomized range finder vs exact SVD), plus the last stage of the
range finder two ways: an SVD of the wide (r+p)×n sketch B vs the eigh of its Gram matrix B Bᵀ (what we use). The
range finder runs with the GaLore defaults (`power_iters`, `oversample` = p).

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

from hf_galore.optim.base import LOW_RANK_DEFAULTS
from hf_galore.projection.random import gaussian_projection
from hf_galore.projection.subspace import left_basis

POWER_ITERS, OVERSAMPLE = LOW_RANK_DEFAULTS["power_iters"], LOW_RANK_DEFAULTS["oversample"]
SHAPES = [(768, 3072, 8), (1024, 2736, 256), (4096, 4096, 128), (4096, 11008, 256), (4096, 11008, 512)]


def _gram_eigh(small: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(small @ small.T)[1]


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
    print(
        f"| m × n | r | FLoRA projection n×r (ms) | randomized refresh, q={POWER_ITERS}, p={OVERSAMPLE} (ms) "
        "| exact SVD (ms) "
        "| last stage: SVD of B (ms) | last stage: eigh of B Bᵀ (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, n, r in SHAPES:
        grad = torch.randn(m, n, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        flora = _median_ms(partial(gaussian_projection, 0, n, r, device, torch.float32), args.repeats, args.device)
        refresh = partial(left_basis, grad, r, "randomized", POWER_ITERS, OVERSAMPLE, generator)
        randomized = _median_ms(refresh, args.repeats, args.device)
        exact = _median_ms(partial(left_basis, grad, r, "exact"), 1, args.device) if args.exact else float("nan")
        small = torch.randn(r + OVERSAMPLE, n, device=device)
        small_svd = _median_ms(partial(torch.linalg.svd, small, full_matrices=False), args.repeats, args.device)
        gram_eigh = _median_ms(partial(_gram_eigh, small), args.repeats, args.device)
        print(
            f"| {m} × {n} | {r} | {flora:.2f} | {randomized:.1f} | {exact:.0f} | {small_svd:.1f} | {gram_eigh:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
