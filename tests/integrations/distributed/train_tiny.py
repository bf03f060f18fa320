"""Train a tiny RoBERTa classifier with the stock Trainer; launched once per process by tests/integrations/test_distributed.py.

Writes, per rank, `rank{R}.pt` with the final parameters, a per-parameter checksum of every optimizer state tensor
(bases, moments; Q-GaLore's INT8 codes), the INT8 weights and the logged losses, so the test can compare one process against two.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/

from conftest import tiny_roberta_config
from trainer_utils import classification_dataset, training_args
from transformers import RobertaForSequenceClassification, Trainer

import hf_galore  # noqa: F401
from hf_galore.modules.int8_linear import Int8Linear


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-grad-norm", type=float, default=0.0)
    parser.add_argument("--optim-args", default="rank=4, update_proj_gap=4, scale=1")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="Train in float64 (round-off far below any tolerance).")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_roberta_config())
    if args.float64:
        model = model.double()
    training = training_args(
        args.out,
        args.optim,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.ga,
        max_steps=args.steps,
        max_grad_norm=args.max_grad_norm,
        optim_args=args.optim_args,
        logging_steps=1,
        train_sampling_strategy="sequential",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        warmup_steps=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=classification_dataset(n=160))
    # RoBERTa's forward takes **kwargs, so the Trainer assumes its loss is normalised by `num_items_in_batch` and
    # neither divides it by the accumulation steps nor keeps DDP's mean; its classification loss is a per-batch
    # mean, which would scale gradients by GA × processes for every optimizer. Use the plain mean semantics.
    trainer.model_accepts_loss_kwargs = False
    trainer.train(resume_from_checkpoint=args.resume)
    optimizer = trainer.optimizer.optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    checksums = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                checksums[f"{names[id(p)]}/{key}"] = (float(value.double().sum()), float(value.double().norm()))
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            # Q-GaLore's INT8 weights are buffers (codes, scales, zeros): the codes, and each weight dequantized.
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "int8_weights": {n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, Int8Linear)},
            "checksums": checksums,
            # What the Trainer integration kept out of DDP (Q-GaLore: carriers and INT8 buffers).
            "ddp_ignored": sorted(getattr(model, "_ddp_params_and_buffers_to_ignore", [])),
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "grad_norms": [e.get("grad_norm") for e in trainer.state.log_history if "loss" in e],
            "optimizer_steps": {names[id(p)]: s.get("step") for p, s in optimizer.state.items()},
            "refreshes": {names[id(p)]: s.get("refresh_count") for p, s in optimizer.state.items()},
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
