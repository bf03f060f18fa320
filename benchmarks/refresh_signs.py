"""Which sign convention should a refreshed GaLore basis use? Measured on the evidence recipes, shortened.

A refresh replaces the basis but carries the Adam moments over (the paper's algorithm). Singular vectors are
defined up to sign, so how the new basis' signs are chosen decides what the carried moments mean. The variants
(`refresh_signs` of [`GaLoreConfig`]):

* `svd`: the signs the decomposition returns (galore-torch's behaviour);
* `canonical`: each vector flipped so its largest-magnitude entry is positive;
* `aligned`: each vector flipped when its dot product with the previous basis' vector is negative;
* `rotate`: aligned, and the moments rotated into the new basis (M ← L M R, V ← (L∘L) V (R∘R)).

Setups (the evidence recipes of `recipes/evidence/`, shortened so the whole sweep takes at most about 35
CPU-minutes, one thread per run, on a busy 2-core machine; gaps small enough for several refreshes):

* `movie_reviews`, `sms_spam`: all-MiniLM-L6-v2 fine-tuned through `recipes/glue/run_glue.py` exactly as
  `recipes/evidence/sentiment_table.py` runs `galore_r8` (rank 8, scale 4, lr 1e-4, batch 32, length 64, linear
  schedule, 10 warm-up steps, evaluation on the 1,000 held-out examples), but 40 / 30 steps instead of 100 / 60
  and `update_proj_gap` 8 / 6 instead of 50 (5 bases per weight);
* `pretrain`: the small LLaMA of `recipes/evidence/pretrain_small_llama.py` with `galore_adamw` (rank 32, scale
  0.25, lr 1e-2), 240 steps instead of 1,500 and gap 20 instead of 200 (12 bases per weight).

Every variant of a setup sees the same initialisation and batches; only `refresh_signs` differs. Each run's result
is written as soon as it finishes (`--json`), and runs already in the file are skipped, so the sweep resumes. ::

    OMP_NUM_THREADS=1 python benchmarks/refresh_signs.py --json benchmarks/results/refresh_signs_cpu.json \\
        --workdir /tmp/refresh_signs --seeds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "recipes" / "evidence"))

VARIANTS = ("svd", "canonical", "aligned", "rotate")
FINETUNE_STEPS = {"movie_reviews": 40, "sms_spam": 30}
FINETUNE_GAP = {"movie_reviews": 8, "sms_spam": 6}
PRETRAIN_STEPS = 240
PRETRAIN_GAP = 20


def finetune(dataset: str, variant: str, seed: int, workdir: Path) -> dict[str, Any]:
    """One `run_glue.py` process with `sentiment_table.py`'s `galore_r8` settings, shortened."""
    from sentiment_table import COMMON_ARGS, RUN_GLUE, _flags, write_dataset

    from hf_galore.examples.offline_assets import minilm_path

    files = write_dataset(dataset, workdir / "data" / dataset)
    run_dir = workdir / dataset / variant / f"seed{seed}"
    args = {
        **COMMON_ARGS,
        "optim": "galore_adamw",
        "learning_rate": 1e-4,
        "rank": 8,
        "scale": 4,
        "update_proj_gap": FINETUNE_GAP[dataset],
        "optim_args": f"refresh_signs={variant}",
        "model_name_or_path": minilm_path(),
        "train_file": str(files[0]),
        "validation_file": str(files[1]),
        "max_steps": FINETUNE_STEPS[dataset],
        "seed": seed,
        "output_dir": str(run_dir),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        done = subprocess.run([sys.executable, str(RUN_GLUE), *_flags(args)], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{dataset}/{variant} failed (exit {done.returncode}); see {run_dir}/log.txt")
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["final"]["metrics"]
    return {
        "eval_loss": metrics["eval_loss"],
        "accuracy": metrics["eval_accuracy"],
        "f1": metrics["eval_f1"],
        "steps": FINETUNE_STEPS[dataset],
        "update_proj_gap": FINETUNE_GAP[dataset],
        "wall_s": time.perf_counter() - start,
    }


_PRETRAIN_DATA: dict[str, Any] = {}


def pretrain(variant: str, seed: int, workdir: Path) -> dict[str, Any]:
    """`pretrain_small_llama.py`'s `galore_adamw` run, shortened, with `refresh_signs=variant`."""
    import pretrain_small_llama as recipe

    if not _PRETRAIN_DATA:  # tokenizer and blocks once per process
        lines = recipe.movie_dialog_lines()
        split = len(lines) - len(lines) // 50
        tokenizer = recipe.build_tokenizer(lines[:split], 4096)
        valid = recipe.Blocks(recipe.token_stream(lines[split:], tokenizer), 128)
        valid.blocks = valid.blocks[:256]
        _PRETRAIN_DATA.update(
            train=recipe.Blocks(recipe.token_stream(lines[:split], tokenizer), 128), valid=valid, vocab=len(tokenizer)
        )
    name = f"galore_{variant}"
    recipe.METHODS[name] = {
        "optim": "galore_adamw",
        "learning_rate": 1e-2,
        "optim_args": f"rank=32, scale=0.25, update_proj_gap={PRETRAIN_GAP}, refresh_signs={variant}",
    }
    args = argparse.Namespace(
        output_dir=str(workdir / "pretrain"), max_steps=PRETRAIN_STEPS, batch_size=8, block_size=128, seed=seed
    )
    result = recipe.run_method(name, args, _PRETRAIN_DATA["train"], _PRETRAIN_DATA["valid"], _PRETRAIN_DATA["vocab"])
    return {
        "eval_loss": result["eval_loss"],
        "train_loss": result["train_loss"],
        "steps": PRETRAIN_STEPS,
        "update_proj_gap": PRETRAIN_GAP,
        "wall_s": result["train_seconds"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/results/refresh_signs_cpu.json")
    parser.add_argument("--workdir", default="/tmp/refresh_signs")
    parser.add_argument("--setups", nargs="+", default=["pretrain", "sms_spam", "movie_reviews"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    args = parser.parse_args(argv)
    import torch
    import transformers

    path = Path(args.json)
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    report.update(
        {
            "description": __doc__.split("::")[0].strip(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
    )
    runs: dict[str, Any] = report.setdefault("runs", {})
    for seed in args.seeds:
        for setup in args.setups:
            for variant in args.variants:
                key = f"{setup}/{variant}/seed{seed}"
                if key in runs:
                    continue
                if setup == "pretrain":
                    result = pretrain(variant, seed, Path(args.workdir))
                else:
                    result = finetune(setup, variant, seed, Path(args.workdir))
                runs[key] = result
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(report, indent=2) + "\n")
                print(key, json.dumps(result), flush=True)
    markdown = to_markdown(runs)
    path.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    return report


def to_markdown(runs: dict[str, Any]) -> str:
    """One table per setup: each variant's metrics (the mean over the seeds run, seeds listed)."""
    lines = []
    setups = dict.fromkeys(key.split("/")[0] for key in runs)
    for setup in setups:
        rows = {key: value for key, value in runs.items() if key.startswith(f"{setup}/")}
        metrics = [m for m in ("eval_loss", "train_loss", "accuracy", "f1") if m in next(iter(rows.values()))]
        first = next(iter(rows.values()))
        lines += [
            f"### {setup} ({first['steps']} steps, update_proj_gap {first['update_proj_gap']})",
            "",
            "| refresh_signs | seeds | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]
        for variant in VARIANTS:
            results = [v for k, v in rows.items() if k.split("/")[1] == variant]
            if not results:
                continue
            seeds = [k.split("/")[2].removeprefix("seed") for k in rows if k.split("/")[1] == variant]
            means = [sum(r[m] for r in results) / len(results) for m in metrics]
            lines.append(f"| {variant} | {', '.join(seeds)} | " + " | ".join(f"{x:.4f}" for x in means) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
