"""hf_galore optimizers on PEFT models: LoRA factors get the plain inner update, `modules_to_save` copies can be
projected, frozen and quantized base layers are never targets."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import assert_close_on_scale, tiny_roberta_config
from torch import nn
from trainer_utils import classification_dataset, make_trainer, training_args

from hf_galore import NoTargetModulesError, optimizer_cls_and_kwargs
from hf_galore.targeting import resolve_target_modules

peft = pytest.importorskip("peft")

HEAD_REGEX = r".*classifier\.modules_to_save\.default\.(dense|out_proj)"


def _lora_model():
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    base = RobertaForSequenceClassification(tiny_roberta_config())
    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model = peft.get_peft_model(base, config)
    for name, param in model.named_parameters():  # PEFT initialises lora_B to zero; make every factor non-trivial
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    return model


def _batch(n: int = 8, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 99, (n, length), generator=g),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def test_lora_targets_are_the_modules_to_save_copies_only():
    model = _lora_model()
    resolution = resolve_target_modules(model, HEAD_REGEX)
    assert sorted(resolution.names) == [
        "base_model.model.classifier.modules_to_save.default.dense",
        "base_model.model.classifier.modules_to_save.default.out_proj",
    ]
    # A regex that also matches the LoRA layers, their factors and frozen base layers projects none of them.
    mixed = resolve_target_modules(model, r".*(query|value).*|" + HEAD_REGEX)
    assert mixed.names == resolution.names
    skipped = dict(mixed.skipped)
    assert set(skipped) == {
        f"base_model.model.roberta.encoder.layer.{i}.attention.self.{proj}{suffix}"
        for i in range(2)
        for proj in ("query", "value")
        for suffix in ("", ".base_layer", ".lora_A.default", ".lora_B.default")
    }
    assert all(reason.startswith("PEFT adapter") for reason in skipped.values())
    with pytest.raises(NoTargetModulesError, match="already low-rank"):
        resolve_target_modules(model, r".*(query|value).*")


def test_all_linear_on_a_lora_model_explains_what_to_do():
    model = _lora_model()
    with pytest.raises(NoTargetModulesError, match="modules_to_save") as error:
        resolve_target_modules(model, "all-linear")
    assert "adamw_torch" in str(error.value)


def test_param_groups_cover_every_trainable_parameter_once_and_no_frozen_one(tmp_path):
    model = _lora_model()
    args = training_args(tmp_path, "galore_adamw", optim_target_modules=HEAD_REGEX, optim_args="rank=2, scale=1")
    _, kwargs = optimizer_cls_and_kwargs(args, model)
    grouped = [p for group in kwargs["params"] for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    projected = {id(p) for g in kwargs["params"] if g.get("low_rank") for p in g["params"]}
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert projected == {id(head.dense.weight), id(head.out_proj.weight)}


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adafactor"])
def test_lora_factors_follow_the_plain_inner_update_and_head_updates_are_low_rank(tmp_path, optim):
    """Five steps: the LoRA factors equal the same update without GaLore (bit for bit for AdamW), the projected head
    weight moves by a rank-≤r update on the first step, and nothing frozen moves."""
    model = _lora_model()
    reference_model = copy.deepcopy(model)
    args = training_args(
        tmp_path,
        optim,
        optim_target_modules=HEAD_REGEX,
        optim_args="rank=1, update_proj_gap=100, scale=1",
        weight_decay=0.0,
    )
    cls, kwargs = optimizer_cls_and_kwargs(args, model)
    optimizer = cls(**kwargs)
    # The reference: the same hf_galore optimizer for the projected head weights only, and the plain optimizer
    # (torch's AdamW / transformers' Adafactor) for everything else, i.e. the LoRA factors and the head's biases.
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(reference_model.named_parameters())
    ref_groups = [
        {**group, "params": [ref_params[names[id(p)]] for p in group["params"]]} for group in kwargs["params"]
    ]
    reference_galore = cls(**{**kwargs, "params": [g for g in ref_groups if g.get("low_rank")]})
    plain = [p for g in ref_groups if not g.get("low_rank") for p in g["params"]]
    if optim == "galore_adamw":
        reference_plain = torch.optim.AdamW(plain, lr=args.learning_rate, weight_decay=0.0, foreach=False)
    else:
        from transformers.optimization import Adafactor

        reference_plain = Adafactor(plain, lr=args.learning_rate, scale_parameter=False, relative_step=False)
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    ref_lora = [ref_params[n] for n, _ in lora]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    dense = model.base_model.model.classifier.modules_to_save["default"].dense.weight
    for step in range(5):
        batch = _batch(seed=step)
        for m in (model, reference_model):
            m.zero_grad()
            m(**batch).loss.backward()
        before = dense.detach().clone()
        optimizer.step()
        reference_galore.step()
        reference_plain.step()
        if step == 0:
            assert torch.linalg.matrix_rank(dense.detach() - before).item() == 1
    for (name, ours), theirs in zip(lora, ref_lora, strict=True):
        if optim == "galore_adamw":
            assert torch.equal(ours, theirs), name
        else:  # our Adafactor vs transformers': same algorithm, different operation order
            assert_close_on_scale(ours, theirs, msg=name)
        assert not torch.equal(ours, dict(_lora_model().named_parameters())[name]), f"{name} never moved"
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"


def test_lora_model_trains_and_resumes_through_the_stock_trainer(tmp_path):
    """The Trainer path: a checkpoint mid-run resumed equals the uninterrupted run on the trainable weights."""
    dataset = classification_dataset()

    def run(output_dir, max_steps, resume=None):  # rank 2 ≥ out_proj's 2 rows: that one falls back (one warning)
        model = _lora_model()
        args = training_args(
            output_dir,
            "galore_adamw",
            optim_target_modules=HEAD_REGEX,
            max_steps=max_steps,
            optim_args="rank=2, update_proj_gap=3, scale=1",
            save_strategy="steps",
            save_steps=4,
        )
        trainer = make_trainer(model, args, dataset)
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = run(tmp_path / "full", 8)  # saves checkpoint-4 on the way
    resumed = run(tmp_path / "resumed", 8, resume=str(tmp_path / "full" / "checkpoint-4"))
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_quantized_bitsandbytes_layers_are_never_targets(caplog):
    bnb = pytest.importorskip("bitsandbytes")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = bnb.nn.Linear8bitLt(16, 16, bias=False, has_fp16_weights=False)
            self.k_proj = bnb.nn.Linear4bit(16, 16, bias=False)
            self.v_proj = nn.Linear(16, 16, bias=False)

    model = nn.Sequential(Block())
    for targets in (["q_proj", "k_proj", "v_proj"], "all-linear", r".*proj"):
        resolution = resolve_target_modules(model, targets)
        assert resolution.names == ["0.v_proj"], targets
        skipped = dict(resolution.skipped)
        assert set(skipped) == {"0.q_proj", "0.k_proj"}
        assert all("quantized bitsandbytes layer" in reason for reason in skipped.values())
    with pytest.raises(NoTargetModulesError, match="quantized bitsandbytes layer"):
        resolve_target_modules(model, ["q_proj", "k_proj"])
    from hf_galore.targeting import log_resolution

    with caplog.at_level(logging.WARNING, logger="hf_galore.targeting"):
        log_resolution(resolve_target_modules(model, "all-linear"), "galore_adamw")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Linear8bitLt" in warnings[0].getMessage()
