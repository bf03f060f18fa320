"""Train a tiny LLaMA with the stock Trainer under accelerate's FSDP2 (gloo, CPU), or in one process; launched by
tests/integrations/test_fsdp2_features.py.

`--fsdp args`: `TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2, ...})`; `--fsdp env`: accelerate's
launch config as the processes see it (`ACCELERATE_USE_FSDP=true`, `FSDP_VERSION=2`, `FSDP_AUTO_WRAP_POLICY`, ...).
Either way the run goes through the real code path: the Trainer builds our optimizer on the plain model (transformers
5.x does not delay it under FSDP2), `Accelerator.prepare` shards the model (`fsdp2_prepare_model` → `fully_shard`)
and swaps the DTensor parameters into the optimizer (`fsdp2_switch_optimizer_parameters`), the Trainer clips with
`accelerator.clip_grad_norm_` and steps.

The one test-only patch, [`enable_fsdp_on_cpu`]: accelerate turns FSDP on only for accelerator process types
(`AcceleratorState.__init__` sets `DistributedType.FSDP` and keeps the plugin only in its MULTI_GPU/NPU/XPU/... branch,
accelerate/state.py:986-1016 in accelerate 1.15), so on CPU (`MULTI_CPU`) it drops the plugin and the Trainer
(`is_fsdp_enabled = state.fsdp_plugin is not None`, transformers/trainer.py:875 in 5.24) trains plain DDP. The patch
puts the plugin the Trainer built (or accelerate's env-built one) into the state with `DistributedType.FSDP` right
after the accelerator is created; nothing else changes.

`--save-steps K` saves Trainer checkpoints (model and optimizer: accelerate's `save_fsdp_model`/`save_fsdp_optimizer`
under FSDP2, with `--state-dict-type` of `fsdp_config`); `--resume CHECKPOINT` continues from one
(`trainer.train(resume_from_checkpoint=...)`), under `torchrun` also on one process with FSDP2 (a process group of one).

Writes `rank{R}.pt`: logged losses and gradient norms (a resumed run's include the checkpoint's), final parameters
(`full_tensor()`), the names of the projected parameters, what ran (FSDP2 on, DTensor parameters in the optimizer,
`FSDPModule` wrappers), the optimizer class and its step counters.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/

from conftest import tiny_llama_config
from trainer_utils import lm_dataset, training_args
from transformers import LlamaForCausalLM, Trainer

import hf_galore  # registers the optim= names; its optimizer_cls_and_kwargs regroups the sharded model

#: accelerate's FSDP launch config as environment variables (what `accelerate launch --config_file` exports).
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}  # fmt: skip


def full(p: torch.Tensor) -> torch.Tensor:
    """A copy of the whole parameter (`full_tensor()` gathers a DTensor's shards)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def enable_fsdp_on_cpu() -> None:
    """Test-only: keep accelerate's FSDP plugin on CPU processes (see the module docstring for why it is needed)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = Trainer.create_accelerator_and_postprocess

    def create_accelerator_and_postprocess(self: Trainer) -> None:
        original(self)
        state = self.accelerator.state
        if getattr(state, "fsdp_plugin", None) is not None:
            return
        if self.args.fsdp_plugin_args is not None:
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        elif os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
            plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* as accelerate does
        else:
            return
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        # Every later `AcceleratorState()` copies PartialState's shared state over its own (accelerate/state.py:919),
        # so the FSDP type goes there too, as accelerate itself does on GPUs (accelerate/state.py:1037).
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", choices=["none", "args", "env"], default="none")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--optim-args", default="rank=4, update_proj_gap=3, scale=1")
    parser.add_argument("--max-grad-norm", type=float, default=0.5)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="A checkpoint folder to resume from.")
    parser.add_argument("--state-dict-type", default="SHARDED_STATE_DICT", help="fsdp_config's, with --fsdp args.")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp_kwargs = {}
    if args.fsdp == "args":
        fsdp_kwargs = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "state_dict_type": args.state_dict_type,
                                                             "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}  # fmt: skip
    elif args.fsdp == "env":
        os.environ.update(FSDP2_ENV)
    clips = []
    if args.fsdp != "none":
        enable_fsdp_on_cpu()
        # Count the calls of accelerate's FSDP2 clipping (`accelerator.clip_grad_norm_` under FSDP2 lands there).
        from accelerate import Accelerator

        dtensor_clip = Accelerator._clip_grad_norm_dtensor_aware

        def counted(self, *a, **k):
            clips.append(1)
            return dtensor_clip(self, *a, **k)

        Accelerator._clip_grad_norm_dtensor_aware = counted

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    training = training_args(
        args.out,
        args.optim,
        per_device_train_batch_size=8 // world,  # two processes see together the one-process batch
        max_steps=args.steps,
        optim_args=args.optim_args,
        max_grad_norm=args.max_grad_norm,
        logging_steps=1,
        warmup_steps=0,
        train_sampling_strategy="sequential",
        ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None,  # torchrun, any number of processes
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        **fsdp_kwargs,
    )
    trainer = Trainer(model=model, args=training, train_dataset=lm_dataset())
    # Every sequence has the same length: the per-process token mean averaged over the processes is the global mean.
    trainer.model_accepts_loss_kwargs = False
    trainer.train(resume_from_checkpoint=args.resume)

    from torch.distributed.fsdp import FSDPModule

    optimizer = trainer.optimizer.optimizer
    wrapped = trainer.model  # under FSDP the Trainer keeps the sharded model here
    names = {id(p): n for n, p in wrapped.named_parameters()}
    low_rank = [names[id(p)] for g in optimizer.param_groups if g["low_rank"] for p in g["params"]]
    groups = [sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups]
    # Our grouping (target modules by name, transformers' decay split) run again on the sharded model: fully_shard
    # keeps the module and parameter names, so the groups are the ones built on the plain model before prepare.
    _, kwargs = hf_galore.optimizer_cls_and_kwargs(training, wrapped)
    regrouped = [sorted(names[id(p)] for p in g["params"]) for g in kwargs["params"]]
    log = [e for e in trainer.state.log_history if "loss" in e]
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {
            "losses": [e["loss"] for e in log],
            "grad_norms": [e["grad_norm"] for e in log],
            "params": {n: full(p) for n, p in wrapped.named_parameters()},
            "low_rank": sorted(low_rank),
            "groups": groups,
            "regrouped": regrouped,
            "fsdp2": bool(trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2),
            "fsdp2_clips": len(clips),
            "dtensor_params": sum(hasattr(p, "to_local") for g in optimizer.param_groups for p in g["params"]),
            "params_in_optimizer": sum(len(g["params"]) for g in optimizer.param_groups),
            "fsdp_modules": sum(isinstance(m, FSDPModule) for m in wrapped.modules()),
            "optimizer": type(optimizer).__name__,
            "steps": sorted({s["step"] for s in optimizer.state.values()}),
        },
        os.path.join(args.out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
