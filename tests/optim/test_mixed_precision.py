"""Mixed precision: bf16 autocast and pure-bf16 weights through the Trainer, fp16 loss scaling with GradScaler."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn
from trainer_utils import lm_dataset, make_trainer, training_args
from transformers import LlamaForCausalLM

from hf_galore.methods.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_layerwise"])
def test_bf16_autocast_trains_and_decomposes_in_fp32(tmp_path, name, decomposition_dtypes):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    trainer = make_trainer(model, training_args(tmp_path, name, bf16=True, max_steps=12), lm_dataset())
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    assert decomposition_dtypes and set(decomposition_dtypes) == {torch.float32}


def test_pure_bf16_weights_keep_fp32_moments_and_bf16_bases(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    trainer = make_trainer(
        model, training_args(tmp_path, "galore_adamw", max_steps=12, learning_rate=1e-2), lm_dataset()
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    state = trainer.optimizer.optimizer.state[model.model.layers[0].mlp.up_proj.weight]
    assert state["exp_avg"].dtype == torch.float32
    basis = state.get("proj_left", state.get("proj_right"))
    assert basis.dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor])
def test_grad_scaler_skips_inf_steps_without_touching_counters_or_state(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    groups = [{"params": [model[0].weight, model[2].weight], "low_rank": True},
              {"params": [model[0].bias, model[2].bias]}]  # fmt: skip
    optimizer = cls(groups, lr=1e-2, rank=2, update_proj_gap=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 16)

    def train_step(inject_inf: bool) -> None:
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        if inject_inf:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(optimizer)  # unscales first; skips optimizer.step() on inf
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    train_step(False)
    train_step(False)
    snapshot = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[model[0].weight].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    train_step(True)
    state = optimizer.state[model[0].weight]
    assert state["step"] == 2 and state["refresh_count"] == snapshot["refresh_count"] == 1
    for key, value in state.items():
        if torch.is_tensor(value):
            assert torch.equal(value, snapshot[key]), key
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert scaler.get_scale() == 2.0**7  # the scaler backed off
    train_step(False)
    assert state["step"] == 3 and state["refresh_count"] == 2  # refresh happens at the next real step (step 2)
