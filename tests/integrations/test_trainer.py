"""The stock transformers Trainer with every registered optimizer: training, resume, logging, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_on_scale, tiny_llama_config, tiny_roberta_config
from trainer_utils import classification_dataset, lm_dataset, make_trainer, training_args
from transformers import LlamaForCausalLM, RobertaForSequenceClassification, Trainer

from hf_galore import REGISTRY

NAMES = sorted(n for n, spec in REGISTRY.items() if spec.method == "GaLore")  # WeLore: tests/methods/test_welore.py


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "roberta":
        return RobertaForSequenceClassification(tiny_roberta_config()), classification_dataset()
    return LlamaForCausalLM(tiny_llama_config()), lm_dataset()


@pytest.mark.parametrize("kind", ["roberta", "llama"])
@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_trains_through_the_stock_trainer(tmp_path, name, kind):
    model, dataset = _model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(model, training_args(tmp_path, name), dataset)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    optimizer = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    assert type(optimizer) is REGISTRY[name].optimizer_cls
    low_rank_groups = [g for g in optimizer.param_groups if g["low_rank"]]
    assert len(low_rank_groups) == 1 and low_rank_groups[0]["rank"] == 4
    # transformers' all-linear under the galore_* names: the encoder/decoder Linears plus the head (RoBERTa's
    # classifier.dense and classifier.out_proj, LLaMA's lm_head).
    assert len(low_rank_groups[0]["params"]) == (14 if kind == "roberta" else 15)
    assert loss_after < loss_before
    unmoved = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unmoved == []
    large = [p for p in low_rank_groups[0]["params"] if min(p.shape) > 4]  # out_proj (2×32) is below rank 4
    assert len(large) == (13 if kind == "roberta" else 15)
    assert all(optimizer.state[p]["side"] and optimizer.state[p]["refresh_count"] == 6 for p in large)  # 0, 4, ..., 20


_RESUME_ARGS = dict(max_steps=12, save_strategy="steps", save_steps=2, logging_steps=1)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """`name` -> (checkpoint folder, final parameters) of one uninterrupted 12-step run, trained once per module."""
    runs = {}

    def run(name):
        if name not in runs:
            output_dir = tmp_path_factory.mktemp(f"uninterrupted_{name}")
            model, dataset = _model("roberta")
            make_trainer(model, training_args(output_dir, name, **_RESUME_ARGS), dataset).train()
            runs[name] = output_dir, {n: p.detach().clone() for n, p in model.named_parameters()}
        return runs[name]

    return run


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("checkpoint", [6, 8], ids=["mid-period", "at-refresh"])  # update_proj_gap=4
def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path, uninterrupted_run, name, checkpoint):
    full_dir, uninterrupted = uninterrupted_run(name)
    resumed_model, dataset = _model("roberta")
    trainer = make_trainer(resumed_model, training_args(tmp_path / "resumed", name, **_RESUME_ARGS), dataset)
    trainer.train(resume_from_checkpoint=str(full_dir / f"checkpoint-{checkpoint}"))
    for n, p in resumed_model.named_parameters():
        assert torch.equal(p, uninterrupted[n]), n


def test_optimizer_checkpoint_loads_with_weights_only(tmp_path):
    model, dataset = _model("llama")
    args = training_args(tmp_path, "galore_adamw_8bit", max_steps=4, save_strategy="steps", save_steps=4,
                         optim_args="rank=4, min_8bit_size=0")  # fmt: skip
    make_trainer(model, args, dataset).train()
    state = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=True)
    entries = list(state["state"].values())
    # min_8bit_size=0: every parameter keeps 8-bit moments, and they load back as uint8 codes
    assert all(s["exp_avg_q"].dtype == s["exp_avg_sq_q"].dtype == torch.uint8 for s in entries)
    # each projected weight (the 15 Linear layers "all-linear" selects) loads back with exactly one fp32 basis
    projected = [s for s in entries if "proj_left" in s or "proj_right" in s]
    assert len(projected) == 15
    assert all(("proj_left" in s) != ("proj_right" in s) for s in projected)
    assert all(s.get("proj_left", s.get("proj_right")).dtype == torch.float32 for s in projected)


def test_layerwise_logs_applied_learning_rate_and_true_grad_norm(tmp_path):
    model, dataset = _model("roberta")
    args = training_args(tmp_path, "galore_adamw_layerwise", max_steps=8, logging_steps=1, warmup_steps=4)
    trainer = make_trainer(model, args, dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8
    assert all(entry["grad_norm"] > 0 for entry in logs)
    # Warmup over 4 steps then linear decay to 0 at step 8, logged before each scheduler step.
    expected = [0.0, 1.25e-3, 2.5e-3, 3.75e-3, 5e-3, 3.75e-3, 2.5e-3, 1.25e-3]
    assert [entry["learning_rate"] for entry in logs] == pytest.approx(expected)


def test_layerwise_grad_norm_equals_the_non_layerwise_norm(tmp_path):
    norms = {}
    for name in ("galore_adamw", "galore_adamw_layerwise"):
        model, dataset = _model("roberta")
        # A huge clipping threshold makes every transformers version log the pre-clip norm without clipping.
        max_grad_norm = 0.0 if name.endswith("layerwise") else 1e9
        args = training_args(tmp_path / name, name, max_steps=3, logging_steps=1, max_grad_norm=max_grad_norm)
        trainer = make_trainer(model, args, dataset)
        trainer.train()
        norms[name] = [e["grad_norm"] for e in trainer.state.log_history if "loss" in e]
    assert norms["galore_adamw_layerwise"] == pytest.approx(norms["galore_adamw"], rel=1e-5)


def test_no_patching_path_with_optimizer_cls_and_kwargs(tmp_path):
    import hf_galore

    model, dataset = _model("roberta")
    args = training_args(tmp_path, "adamw_torch", max_steps=4)
    trainer = make_trainer(
        model, args, dataset, optimizer_cls_and_kwargs=hf_galore.optimizer_cls_and_kwargs(args, model, "galore_adamw")
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, hf_galore.GaLoreAdamW)


def test_a_trainer_that_builds_another_optimizer_is_caught(tmp_path):
    class SneakyTrainer(Trainer):
        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            return torch.optim.AdamW, {"lr": args.learning_rate}

    model, dataset = _model("roberta")
    trainer = SneakyTrainer(model=model, args=training_args(tmp_path, "galore_adamw", max_steps=2),
                            train_dataset=dataset)  # fmt: skip
    with pytest.raises(RuntimeError, match="should have built GaLoreAdamW"):
        trainer.train()


def test_training_args_round_trip_through_pickle_and_cli(tmp_path):
    import pickle

    from transformers import HfArgumentParser, TrainingArguments

    args = training_args(tmp_path, "galore_adamw_8bit_layerwise")
    assert pickle.loads(pickle.dumps(args)).optim == "galore_adamw_8bit_layerwise"
    (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "galore_adafactor", "--optim_args", "rank=4"]
    )
    assert parsed.optim == "galore_adafactor"


def test_tied_embeddings_with_gradient_checkpointing_in_the_trainer(tmp_path):
    results = {}
    for name in ("galore_adamw", "galore_adamw_layerwise"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        args = training_args(tmp_path / name, name, max_steps=6, gradient_checkpointing=True, max_grad_norm=0.0,
                             gradient_checkpointing_kwargs={"use_reentrant": True})  # fmt: skip
        trainer = make_trainer(model, args, lm_dataset())
        trainer.train()
        assert trainer.optimizer.optimizer.state[model.lm_head.weight]["step"] == 6
        results[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in results["galore_adamw"].items():
        assert_close_on_scale(results["galore_adamw_layerwise"][n], p)


def test_layerwise_honours_lr_scheduler_kwargs_and_logs_the_applied_rate(tmp_path):
    from transformers import get_scheduler

    model, dataset = _model("roberta")
    args = training_args(tmp_path, "galore_adamw_layerwise", max_steps=10, logging_steps=1, warmup_steps=2,
                         lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})  # fmt: skip
    trainer = make_trainer(model, args, dataset)
    trainer.train()
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler("cosine_with_min_lr", reference, num_warmup_steps=2, num_training_steps=10,
                              scheduler_specific_kwargs={"min_lr_rate": 0.1})  # fmt: skip
    expected = []
    for _ in range(10):
        expected.append(scheduler.get_last_lr()[0])
        scheduler.step()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(expected)
    assert min(logged[2:]) >= 0.1 * args.learning_rate * 0.999


def test_layerwise_clipping_leaves_the_users_training_arguments_untouched(tmp_path):
    model, dataset = _model("roberta")
    args = training_args(tmp_path, "galore_adamw_layerwise", max_steps=2, max_grad_norm=0.5)
    trainer = make_trainer(model, args, dataset)
    trainer.train()
    assert args.max_grad_norm == 0.5  # the user's object
    assert trainer.args.max_grad_norm == 0.0 and trainer.optimizer.optimizer.max_grad_norm == 0.5
    # A second Trainer from the same arguments clips again (nothing was remembered on `args`).
    second = make_trainer(_model("roberta")[0], args, dataset)
    second.create_optimizer()
    assert second.optimizer.max_grad_norm == 0.5


def test_hand_built_layerwise_optimizer_follows_accumulation_and_clipping_like_the_registered_one(tmp_path):
    """`Trainer(optimizers=(GaLoreAdamWLayerwise(...), None))` with GA 2 and clipping equals `optim=` by name."""
    from hf_galore import optimizer_cls_and_kwargs

    results = {}
    for how in ("by_name", "hand_built"):
        model, dataset = _model("llama")
        args = training_args(tmp_path / how, "galore_adamw_layerwise", max_steps=6, gradient_accumulation_steps=2,
                             per_device_train_batch_size=4, max_grad_norm=0.05)  # fmt: skip
        optimizers = (None, None)
        if how == "hand_built":
            cls, kwargs = optimizer_cls_and_kwargs(args, model)
            for connection in ("sync_gradients", "max_grad_norm"):  # what a user building it by hand leaves out
                kwargs.pop(connection)
            optimizers = (cls(**kwargs), None)
            assert not optimizers[0].has_sync_source
        trainer = make_trainer(model, args, dataset, optimizers=optimizers)
        trainer.train()
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert inner.max_grad_norm == 0.05 and inner.has_sync_source
        assert inner.state[model.model.embed_tokens.weight]["step"] == 6  # one update per optimizer step, not 12
        results[how] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, param in results["by_name"].items():
        assert torch.equal(results["hand_built"][name], param), name


def test_hand_built_layerwise_optimizer_is_refused_in_a_multi_process_run():
    from types import SimpleNamespace

    from hf_galore import GaLoreAdamWLayerwise, UnsupportedSetupError
    from hf_galore.integrations.transformers import _connect_hand_built_layerwise

    weight = torch.nn.Parameter(torch.randn(8, 6))
    optimizer = GaLoreAdamWLayerwise([{"params": [weight], "low_rank": True, "rank": 2}], lr=1e-3)
    with pytest.raises(UnsupportedSetupError, match="optimizer_cls_and_kwargs"):
        _connect_hand_built_layerwise(optimizer, SimpleNamespace(world_size=2, max_grad_norm=1.0))
    assert not optimizer.has_sync_source
    _connect_hand_built_layerwise(optimizer, SimpleNamespace(world_size=1, max_grad_norm=1.0))
    assert optimizer.has_sync_source and optimizer.max_grad_norm == 1.0
