"""Nothing silently wrong (issue #14): hooks outliving their Trainer, non-finite hyperparameters, resuming with
another optimizer or other settings, non-finite gradients."""

from __future__ import annotations

import dataclasses
import gc
import io
import math
import re
import typing
import warnings

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn
from trainer_utils import lm_dataset, make_trainer, training_args
from transformers import LlamaForCausalLM

from hf_galore import InvalidConfigError, UnsupportedSetupError, configs
from hf_galore.methods.flora.optimizer import FloraAdafactor, FloraAdamW, FloraAdamWLayerwise
from hf_galore.methods.galore import (
    GaLoreAdafactor,
    GaLoreAdafactorLayerwise,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreAdamW8bitLayerwise,
    GaLoreAdamWLayerwise,
)
from hf_galore.methods.q_galore.optimizer import QGaLoreAdamW8bit


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------------- item 1: hooks
@pytest.mark.parametrize("second", ["galore_adamw_layerwise", "adamw_torch"])
def test_a_second_trainer_on_the_same_model_trains_after_a_layerwise_one(tmp_path, second):
    model, dataset = _llama(), lm_dataset()
    make_trainer(model, training_args(tmp_path / "a", "galore_adamw_layerwise", max_steps=6), dataset).train()

    before = _snapshot(model)
    trainer = make_trainer(model, training_args(tmp_path / "b", second, max_steps=8), dataset)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unmoved == []


def test_a_plain_backward_after_layerwise_training_keeps_its_gradients(tmp_path):
    model, dataset = _llama(), lm_dataset()
    trainer = make_trainer(model, training_args(tmp_path, "galore_adamw_layerwise", max_steps=4), dataset)
    trainer.train()
    before = _snapshot(model)
    ids = torch.tensor(dataset[0]["input_ids"])[None]
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing stepped
    assert not trainer.optimizer.optimizer.hooks_installed


def test_train_twice_on_one_trainer_and_resume_reinstall_the_hooks(tmp_path):
    dataset = lm_dataset()
    args = dict(max_steps=8, save_strategy="steps", save_steps=4)
    model = _llama()
    make_trainer(model, training_args(tmp_path / "full", "galore_adamw_layerwise", **args), dataset).train()
    uninterrupted = _snapshot(model)

    # A new Trainer resuming on a model that an earlier layer-wise Trainer has trained.
    resumed = _llama()
    make_trainer(resumed, training_args(tmp_path / "x", "galore_adamw_layerwise", max_steps=2), dataset).train()
    trainer = make_trainer(resumed, training_args(tmp_path / "full", "galore_adamw_layerwise", **args), dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    for n, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[n]), n

    # The same Trainer trained again: its optimizer's hooks come back for the run and go at its end.
    optimizer = trainer.optimizer.optimizer
    assert not optimizer.hooks_installed
    before = _snapshot(resumed)
    trainer.args.max_steps = 12
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    assert not optimizer.hooks_installed
    assert all(not torch.equal(p, before[n]) for n, p in resumed.named_parameters())


def test_a_second_optimizer_on_hooked_parameters_names_the_cause():
    model = nn.Linear(12, 10)
    first = GaLoreAdamWLayerwise([{"params": [model.weight], "low_rank": True}, {"params": [model.bias]}], rank=2)
    for cls in (GaLoreAdamWLayerwise, GaLoreAdamW):
        with pytest.raises(UnsupportedSetupError, match=r"remove_hooks\(\)"):
            cls([{"params": [model.weight], "low_rank": True}], rank=2)
    first.remove_hooks()
    second = GaLoreAdamWLayerwise([{"params": [model.weight], "low_rank": True}], rank=2)
    with pytest.raises(UnsupportedSetupError, match="GaLoreAdamWLayerwise"):
        first.install_hooks()
    second.remove_hooks()
    first.install_hooks()
    first.remove_hooks()


def test_hooks_of_a_garbage_optimizer_are_removed():
    model = nn.Linear(12, 10)
    GaLoreAdamWLayerwise([{"params": [model.weight], "low_rank": True}, {"params": [model.bias]}], rank=2)
    gc.collect()
    model(torch.randn(3, 12)).square().sum().backward()
    assert model.weight.grad is not None and model.bias.grad is not None
    GaLoreAdamWLayerwise([{"params": [model.weight], "low_rank": True}], rank=2).remove_hooks()  # no conflict


# ---------------------------------------------------------------------------------------------------- item 4: knobs
def _float_knobs():
    """Every float field of every config dataclass (found, not listed, so a new knob is covered too)."""
    from hf_galore.registry import REGISTRY

    # The shared configs and every method's (registered through its specs; they live in hf_galore.methods).
    candidates = [*vars(configs).values(), *(c for spec in REGISTRY.values() for c in spec.config_classes)]
    knobs = []
    for cls in dict.fromkeys(c for c in candidates if isinstance(c, type)):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and issubclass(cls, configs.OptionsMixin)):
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if float in (hints[f.name], *typing.get_args(hints[f.name])):
                knobs.append((cls, f.name))
    return knobs


def test_the_float_knobs_are_found():
    names = {name for _, name in _float_knobs()}
    assert {"scale", "gamma_proj", "cos_threshold", "clip_threshold", "decay_rate", "beta1"} <= names


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize(("cls", "key"), _float_knobs(), ids=lambda x: getattr(x, "__name__", x))
def test_every_float_knob_must_be_finite(cls, key, bad):
    with pytest.raises(InvalidConfigError, match=rf"{key}.*{bad}|{bad}.*{key}") as raised:
        configs.parse_optim_args(f"{key}={bad}", [cls])
    assert re.search(r"[\[(].*, .*[\])]", str(raised.value))  # the valid range is named
    with pytest.raises(InvalidConfigError, match=key):
        cls(**{key: float(bad)})


_OPTIMIZER_KNOBS = [
    (GaLoreAdamW, "lr"),
    (GaLoreAdamW, "weight_decay"),
    (GaLoreAdamW, "eps"),
    (GaLoreAdamW, "betas"),
    (GaLoreAdamW, "scale"),
    (GaLoreAdamW8bit, "lr"),
    (GaLoreAdafactor, "lr"),
    (GaLoreAdafactor, "weight_decay"),
    (GaLoreAdafactor, "eps"),
    (GaLoreAdafactor, "beta1"),
    (GaLoreAdafactor, "clip_threshold"),
    (GaLoreAdafactor, "decay_rate"),
    (FloraAdamW, "lr"),
    (FloraAdafactor, "beta1"),
    (QGaLoreAdamW8bit, "gamma_proj"),
    (QGaLoreAdamW8bit, "cos_threshold"),
]


def _bad_value(cls, key, bad):
    default = cls.inner_defaults.get(key)
    if isinstance(default, tuple):  # betas, Adafactor's eps: one bad element
        return (default[0], bad)
    return bad


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(("cls", "key"), _OPTIMIZER_KNOBS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("where", ["constructor", "param group"])
def test_optimizer_hyperparameters_must_be_finite(cls, key, bad, where):
    weight = nn.Parameter(torch.randn(12, 10))
    value = _bad_value(cls, key, bad)
    kwargs = {"rank": 2}
    group = {"params": [weight], "low_rank": True}
    (kwargs if where == "constructor" else group)[key] = value
    with pytest.raises(InvalidConfigError, match=rf"{key}.*{bad}"):
        cls([group], **kwargs)


def test_a_nan_learning_rate_or_infinite_scale_is_refused_before_training(tmp_path):
    model, dataset = _llama(), lm_dataset()
    before = _snapshot(model)
    for overrides, key in (({"learning_rate": math.nan}, "lr"), ({"optim_args": "rank=4, scale=inf"}, "scale")):
        trainer = make_trainer(model, training_args(tmp_path, "galore_adamw", max_steps=2, **overrides), dataset)
        with pytest.raises(InvalidConfigError, match=rf"{key}=.*(nan|inf).*finite"):
            trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------------- item 5: resume
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 6))


def _groups(model):
    return [
        {"params": [model[0].weight, model[2].weight], "low_rank": True},
        {"params": [model[0].bias, model[2].bias]},
    ]


def _knobs(cls, **overrides):
    flora = "Flora" in cls.__name__
    kwargs = {"lr": 1e-2 if flora else 3e-2, "rank": 3}
    kwargs.update({"kappa": 4} if flora else {"update_proj_gap": 4, "scale": 1.0})
    if "8bit" in cls.__name__:
        kwargs["min_8bit_size"] = 0
    kwargs.update(overrides)
    return kwargs


def _run(model, optimizer, steps, poison=None, target=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 6, generator=g)
    losses = []
    for step in range(steps):
        handle = target.register_hook(lambda grad: torch.full_like(grad, math.nan)) if step == poison else None
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss))
        loss.backward()
        if handle is not None:
            handle.remove()
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _checkpoint(cls, steps=5, **overrides):
    model = _mlp()
    optimizer = cls(_groups(model), **_knobs(cls, **overrides))
    _run(model, optimizer, steps)
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    ("saved", "resumed", "names"),
    [
        (GaLoreAdamW, GaLoreAdafactor, "galore_adamw"),
        (GaLoreAdamW, FloraAdamW, "galore_adamw"),
        (GaLoreAdamW, GaLoreAdamW8bit, "galore_adamw"),
        (GaLoreAdamW, QGaLoreAdamW8bit, "galore_adamw"),
        (GaLoreAdamW8bit, GaLoreAdamW, "galore_adamw_8bit"),
        (FloraAdamWLayerwise, GaLoreAdamW, "flora_adamw"),
        (GaLoreAdamW8bitLayerwise, GaLoreAdamW, "galore_adamw_8bit"),
    ],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_a_state_written_by_another_optimizer_is_refused(saved, resumed, names):
    state = _checkpoint(saved)
    optimizer = resumed(_groups(_mlp()), **_knobs(resumed))
    with pytest.raises(InvalidConfigError, match=rf"written by {saved._state_kind()} \(optim='{names}'"):
        optimizer.load_state_dict(state)


@pytest.mark.parametrize(
    ("saved", "resumed"), [(GaLoreAdamWLayerwise, GaLoreAdamW), (GaLoreAdamW, GaLoreAdamWLayerwise)]
)
def test_layerwise_and_plain_variants_share_their_state(saved, resumed):
    state = _checkpoint(saved)
    model = _mlp()
    optimizer = resumed(_groups(model), **_knobs(resumed))
    optimizer.load_state_dict(state)
    _run(model, optimizer, 2)
    assert all(s["step"] == 7 for s in optimizer.state.values())


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (GaLoreAdamW, "rank", 4),
        (GaLoreAdamW, "proj_type", "reverse_std"),
        (GaLoreAdamW, "seed", 1),
        (GaLoreAdafactor, "beta1", 0.9),
        (FloraAdamW, "betas", (0.0, 0.999)),
    ],
    ids=str,
)
def test_a_changed_setting_that_shapes_the_state_is_refused(cls, key, value):
    state = _checkpoint(cls)
    optimizer = cls(_groups(_mlp()), **_knobs(cls, **{key: value}))
    with pytest.raises(InvalidConfigError, match="cannot be converted") as raised:
        optimizer.load_state_dict(state)
    assert "momentum" in str(raised.value) if key in ("beta1", "betas") else f"{key}=" in str(raised.value)


def test_a_changed_setting_that_converts_is_used_and_reported():
    state = _checkpoint(GaLoreAdamW)
    model = _mlp()
    optimizer = GaLoreAdamW(_groups(model), **_knobs(GaLoreAdamW, update_proj_gap=3, basis_bits=8, scale=0.5))
    with pytest.warns(UserWarning, match=r"basis_bits: 16 -> 8.*scale: 1.0 -> 0.5.*update_proj_gap: 4 -> 3"):
        optimizer.load_state_dict(state)
    low_rank = optimizer.param_groups[0]
    assert (low_rank["update_proj_gap"], low_rank["basis_bits"], low_rank["scale"]) == (3, 8, 0.5)
    _run(model, optimizer, 2)  # steps 5 and 6; step 6 refreshes (6 % 3 == 0) and stores 8-bit bases
    weight_state = optimizer.state[model[0].weight]
    assert weight_state["refresh_count"] == 3
    assert "proj_left_q" in weight_state or "proj_right_q" in weight_state


def test_an_unchanged_resume_warns_nothing_and_restores_the_scheduled_lr():
    state = _checkpoint(GaLoreAdamW8bit)
    optimizer = GaLoreAdamW8bit(_groups(_mlp()), **_knobs(GaLoreAdamW8bit, lr=0.5))  # lr: the scheduler's business
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.load_state_dict(state)
    assert [g["lr"] for g in optimizer.param_groups] == [3e-2, 3e-2]


def test_the_trainer_refuses_to_resume_a_checkpoint_with_another_optimizer(tmp_path):
    dataset = lm_dataset()
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, optim_args="rank=4")
    make_trainer(_llama(), training_args(tmp_path, "galore_adamw", **args), dataset).train()
    trainer = make_trainer(_llama(), training_args(tmp_path, "flora_adamw", **args), dataset)
    with pytest.raises(InvalidConfigError, match=r"written by GaLoreAdamW \(optim='galore_adamw'"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ---------------------------------------------------------------------------------------------------- item 6: NaN
@pytest.mark.parametrize("at", ["refresh", "between refreshes"])
@pytest.mark.parametrize(
    ("cls", "overrides"),
    [
        (GaLoreAdamW, {}),
        (GaLoreAdamW, {"foreach": False}),
        (GaLoreAdamW8bit, {}),
        (GaLoreAdafactor, {}),
        (GaLoreAdamWLayerwise, {}),
        (GaLoreAdafactorLayerwise, {}),
        (FloraAdamW, {}),
        (FloraAdafactor, {}),
        (FloraAdamWLayerwise, {}),
    ],
    ids=lambda x: getattr(x, "__name__", None) or str(x),
)
def test_a_nonfinite_gradient_skips_that_weights_update_and_training_recovers(cls, overrides, at):
    model = _mlp()
    optimizer = cls(_groups(model), **_knobs(cls, **overrides))
    target, other = model[0].weight, model[2].weight
    losses = _run(model, optimizer, 4)  # steps 0-3; step 4 refreshes (gap 4), step 5 does not

    poisoned = 4 if at == "refresh" else 5
    _run(model, optimizer, poisoned - 4)
    state_before = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[target].items()}
    weight_before = target.detach().clone()
    with pytest.warns(UserWarning, match="NaN/Inf gradient"):
        _run(model, optimizer, 1, poison=0, target=target)
    assert torch.equal(target, weight_before)
    state = optimizer.state[target]
    assert state.pop("nonfinite_skips") == 1
    assert state.keys() == state_before.keys()
    for key, value in state.items():
        assert torch.equal(value, state_before[key]) if torch.is_tensor(value) else value == state_before[key], key
    state["nonfinite_skips"] = 1

    losses += _run(model, optimizer, 8)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert optimizer.nonfinite_skips == 1
    assert optimizer.state[target]["step"] == optimizer.state[other]["step"] - 1
    assert losses[-1] < 0.9 * losses[0]
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()


# ------------------------------------------------------------------------------- one plan per Trainer (issue #17)
@pytest.mark.parametrize(
    ("name", "optim_args", "welore_callback"),
    [
        ("welore_adamw", "target_compression=0.5", False),
        ("welore_adamw", "target_compression=0.5", True),
        ("q_galore_adamw_8bit", "rank=4, update_proj_gap=4", False),
    ],
)
def test_optim_args_are_parsed_once_and_the_surgery_runs_once_per_trainer(
    tmp_path, monkeypatch, name, optim_args, welore_callback
):
    from hf_galore import builder
    from hf_galore.integrations.callbacks import WeLoreCallback
    from hf_galore.registry import REGISTRY

    parses, surgeries = [], []
    parse, spec = builder.parse_optim_args, REGISTRY[name]

    def counting_parse(*args, **kwargs):
        parses.append(args)
        return parse(*args, **kwargs)

    def counting_surgery(*args):
        surgeries.append(args)
        spec.prepare_model(*args)

    monkeypatch.setattr(builder, "parse_optim_args", counting_parse)
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(spec, prepare_model=counting_surgery))
    callbacks = [WeLoreCallback()] if welore_callback else None
    args = training_args(tmp_path, name, optim_args=optim_args, max_steps=2)
    trainer = make_trainer(_llama(), args, lm_dataset(), callbacks=callbacks)
    trainer.train()
    assert len(parses) == 1 and len(surgeries) == 1


def test_a_trainer_plan_is_reused_until_its_arguments_change(tmp_path):
    from types import SimpleNamespace

    from hf_galore.integrations.plans import plan_for

    trainer, args = SimpleNamespace(), training_args(tmp_path, "galore_adamw")
    plan = plan_for(args, trainer=trainer)
    assert plan_for(args, trainer=trainer) is plan and plan.config(configs.MultiTensorConfig).foreach is True
    args.optim_args = "rank=4, foreach=false"
    changed = plan_for(args, trainer=trainer)
    assert changed is not plan and changed.kwargs["foreach"] is False and plan_for(args, trainer=trainer) is changed
