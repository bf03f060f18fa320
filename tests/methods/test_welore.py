"""WeLore: threshold solver, low-rank Linear, LRC/N-LRC split, Trainer training/resume, factorized save/load/merge."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_llama_config, tiny_roberta_config
from torch import nn
from trainer_utils import (
    assert_model_unchanged,
    assert_stock_load_without_hf_galore,
    classification_dataset,
    lm_dataset,
    make_trainer,
    snapshot_model,
    training_args,
)
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM, RobertaForSequenceClassification

import hf_galore
from hf_galore import InvalidConfigError, LowRankLinear, NoTargetModulesError, WeLoreCallback, WeLoreConfig, welore
from hf_galore.cli import main
from hf_galore.projection import spectrum


@pytest.fixture(autouse=True)
def _one_thread():
    """MKL's multi-threaded SVD is very slow on a shared 2-core machine; one thread is faster and deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _roberta(**overrides):
    torch.manual_seed(0)
    return RobertaForSequenceClassification(tiny_roberta_config(**overrides))


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def _welore_args(tmp_path, optim="welore_adamw", **overrides):
    values = dict(optim_args="target_compression=0.5, min_reduction=0.5", learning_rate=5e-3)
    values.update(overrides)
    return training_args(tmp_path, optim, **values)


# ------------------------------------------------------------------------------------------------- solver


def _random_spectra(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"m{i}": (int(m), int(n)) for i, (m, n) in enumerate(torch.randint(48, 160, (24, 2), generator=g))}
    spectra = {}
    for name, (m, n) in shapes.items():
        # Decaying spectra with a per-matrix decay rate, as trained weights have (heavy-tailed vs flat).
        decay = float(torch.rand(1, generator=g)) * 0.1 + 0.005
        w = torch.randn(m, n, generator=g) * torch.exp(-decay * torch.arange(n))
        spectra[name] = welore.singular_values(w)
    return spectra, shapes


@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("min_reduction", [0.0, 0.5])
def test_solver_hits_requested_parameter_compression_on_random_weights(target, min_reduction):
    spectra, shapes = _random_spectra()
    tau, kept = welore.solve_threshold(spectra, shapes, target, min_reduction)
    before = sum(m * n for m, n in shapes.values())
    after = sum(
        k * (sum(shapes[n])) if spectrum.is_lrc(shapes[n], k, min_reduction) else shapes[n][0] * shapes[n][1]
        for n, k in kept.items()
    )
    assert abs((1 - after / before) - target) < 0.01
    assert 0.0 < tau <= 1.0
    # The decision really is one global threshold on min-max normalised spectra.
    for name, k in kept.items():
        normalized = welore.normalize_spectrum(spectra[name])
        assert k == max(int((normalized >= tau).sum()), 1)


def test_normalized_spectrum_is_min_max_and_flat_spectra_are_not_pruned():
    s = torch.tensor([4.0, 2.0, 1.0])
    assert torch.allclose(welore.normalize_spectrum(s), torch.tensor([1.0, 1 / 3, 0.0]))
    assert torch.equal(welore.normalize_spectrum(torch.ones(5)), torch.ones(5))


def test_singular_values_are_fp32_for_bf16_weights():
    w = torch.randn(20, 12).bfloat16()
    s = welore.singular_values(w)
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.linalg.svdvals(w.float()))


@pytest.mark.assets
def test_solver_hits_requested_compression_on_real_minilm_weights():
    from hf_galore.examples.offline_assets import MissingAssetError, minilm_path

    try:
        path = minilm_path()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path)
    for target in (0.3, 0.5):
        plan = welore.analyze(model, target_compression=target)
        assert abs(plan.compression - target) < 0.01
        assert plan.rank_reduction > 0 and plan.lrc_names
        assert len(plan.matrices) == 37  # 6 layers × 6 Linears + the pooler


# ------------------------------------------------------------------------------------------------- LowRankLinear


def test_low_rank_linear_at_full_rank_equals_the_original():
    torch.manual_seed(0)
    dense = nn.Linear(24, 17)
    low = LowRankLinear.from_linear(dense, rank=17)
    x = torch.randn(5, 24)
    torch.testing.assert_close(low(x), dense(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(low.up.bias, dense.bias)  # bias preserved, on the output factor
    assert low.down.bias is None


def test_low_rank_linear_at_rank_k_is_the_best_rank_k_approximation():
    torch.manual_seed(0)
    dense = nn.Linear(30, 20)
    k = 6
    low = LowRankLinear.from_linear(dense, rank=k)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    torch.testing.assert_close(low.merged_weight(), best, rtol=1e-5, atol=1e-5)
    # Eckart–Young: the error is exactly the tail of the spectrum.
    err = torch.linalg.matrix_norm(dense.weight.detach() - low.merged_weight())
    torch.testing.assert_close(err, s[k:].square().sum().sqrt(), rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 30)
    torch.testing.assert_close(low(x), x @ best.T + dense.bias, rtol=1e-5, atol=1e-5)


def test_low_rank_linear_follows_dtype_and_rejects_bad_ranks():
    dense = nn.Linear(8, 6, bias=False).to(torch.bfloat16)
    low = LowRankLinear.from_linear(dense, rank=3)
    assert low.up.weight.dtype == torch.bfloat16 and low.up.bias is None
    with pytest.raises(InvalidConfigError, match="rank=7 is out of range"):
        LowRankLinear(8, 6, rank=7)


# ------------------------------------------------------------------------------------------------- split


def test_split_freezes_everything_but_the_lrc_factors_and_keeps_outputs_close():
    model = _roberta()
    model.eval()
    ids = torch.randint(3, 99, (2, 10))
    plan = welore.compress(model, target_compression=0.3, min_reduction=0.5)
    assert plan.lrc_names and abs(plan.compression - 0.3) < 0.05
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{name}.{f}.weight" for name in plan.lrc_names for f in ("up", "down")}
    assert trainable == expected
    for name in plan.n_lrc_names:
        assert isinstance(model.get_submodule(name), nn.Linear)
    for name, rank in plan.ranks.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == rank
        assert module.up.bias is not None  # RoBERTa's biases are kept
    assert model.config.quantization_config.ranks == plan.ranks
    assert model(input_ids=ids).logits.shape == (2, 2)


def test_trainable_flags_add_norms_biases_embeddings_heads():
    model = _roberta()
    welore.compress(model, WeLoreConfig(train_norms=True, train_biases=True, train_embeddings=True, train_heads=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.out_proj.weight" in names and "classifier.dense.bias" in names
    assert "roberta.embeddings.word_embeddings.weight" in names
    assert "roberta.encoder.layer.0.attention.output.LayerNorm.weight" in names
    assert any(n.endswith("up.bias") for n in names)


def test_compressing_twice_is_refused():
    model = _roberta()
    welore.compress(model)
    with pytest.raises(hf_galore.UnsupportedSetupError, match="already WeLore-compressed"):
        welore.compress(model)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0.0, 1.0, -0.2, 1.5])
def test_target_compression_outside_the_open_interval_is_rejected(value):
    with pytest.raises(InvalidConfigError, match=r"target_compression must be in the open interval \(0, 1\)"):
        WeLoreConfig(target_compression=value)


def test_bad_optim_args_fail_before_training(tmp_path):
    args = _welore_args(tmp_path, optim_args="target_compression=1.5")
    model = _roberta()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InvalidConfigError, match="target_compression"):
        make_trainer(model, args, classification_dataset())  # the split runs at Trainer init
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no_bitsandbytes", hf_galore.MissingDependencyError, "bitsandbytes"),
        ("negative_lr", InvalidConfigError, "learning_rate"),
        ("bad_beta", InvalidConfigError, "betas"),
        ("nothing_trainable", InvalidConfigError, "nothing is trainable"),
        ("callback_bad_key", InvalidConfigError, "update_gap"),
    ],
)
def test_a_refused_run_leaves_the_model_untouched(tmp_path, monkeypatch, case, error, match):
    """Every check that can refuse the run runs before the split (#14): a retry gets the model it passed."""
    model = _roberta()
    snapshot = snapshot_model(model)
    name, overrides, callbacks = "welore_adamw", {}, None
    if case == "no_bitsandbytes":
        from hf_galore.utils import imports

        monkeypatch.setattr(imports, "is_bitsandbytes_available", lambda: False)
        name = "welore_adamw_8bit"
    elif case == "negative_lr":
        overrides["learning_rate"] = -1e-3
    elif case == "bad_beta":
        overrides["adam_beta1"] = 1.0
    elif case == "nothing_trainable":
        overrides["optim_args"] = "target_compression=0.5, min_reduction=0.99"
    else:  # the callback splits inside the stock constructor; the optimizer's settings are checked before it
        name, callbacks = "galore_adamw", [WeLoreCallback(config="target_compression=0.5")]
        overrides["optim_args"] = "rank=4, update_gap=10"
    args = _welore_args(tmp_path, name, **overrides)
    with pytest.raises(error, match=match):
        make_trainer(model, args, classification_dataset(n=8), callbacks=callbacks).train()
    assert_model_unchanged(model, snapshot)


def test_model_with_no_eligible_linear_names_the_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(NoTargetModulesError, match="Conv1D layer"):
        welore.analyze(model)


def test_min_reduction_making_everything_n_lrc_errors_when_nothing_trains_and_warns_otherwise(caplog):
    with pytest.raises(InvalidConfigError, match="nothing is trainable"):
        welore.compress(_roberta(), target_compression=0.5, min_reduction=0.99)
    model = _roberta()
    welore.compress(model, target_compression=0.5, min_reduction=0.99, train_norms=True)
    assert "no weight became an LRC" in caplog.text
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert all(("LayerNorm" in n) == p.requires_grad for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------------- save / load / merge


def _tensor_bytes(directory) -> int:
    """Bytes of tensor data in a safetensors file: the file minus its 8-byte length prefix and JSON header."""
    path = directory / "model.safetensors"
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header


def test_save_load_gives_identical_outputs_a_smaller_file_and_merge_equals_u_v(tmp_path):
    dense = _roberta(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    dense.save_pretrained(tmp_path / "dense")
    model = _roberta(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    plan = welore.compress(model, target_compression=0.5)
    model.save_pretrained(tmp_path / "welore")
    ratio = _tensor_bytes(tmp_path / "welore") / _tensor_bytes(tmp_path / "dense")
    assert abs(ratio - (1 - plan.model_compression)) < 1e-9  # exactly the reported ratio
    assert os.path.getsize(tmp_path / "welore" / "model.safetensors") < 0.65 * os.path.getsize(
        tmp_path / "dense" / "model.safetensors"
    )
    recorded = json.loads((tmp_path / "welore" / "config.json").read_text())["quantization_config"]
    assert recorded["quant_method"] == "hf_galore_welore" and recorded["ranks"] == plan.ranks

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "welore")  # the stock call (#14)
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())
    ids = torch.randint(3, 99, (2, 12))
    model.eval()
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    wrapped = welore.from_pretrained(tmp_path / "welore")  # the thin wrapper loads the same
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in wrapped.state_dict().items())

    merged = welore.merge(loaded, inplace=False)
    for name in plan.lrc_names:
        low, lin = loaded.get_submodule(name), merged.get_submodule(name)
        assert type(lin) is nn.Linear
        assert torch.equal(lin.weight, low.up.weight @ low.down.weight)
        assert torch.equal(lin.bias, low.up.bias)
    torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path / "dense_again")
    assert_stock_load_without_hf_galore(
        "AutoModelForSequenceClassification", tmp_path / "welore", "hf_galore_welore", tmp_path / "dense_again"
    )


def test_checkpoint_with_the_record_under_the_old_welore_key_still_loads(tmp_path):
    model = _roberta()
    welore.compress(model, target_compression=0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    record = config.pop("quantization_config")
    del record["quant_method"]
    config["welore"] = record  # the layout before the record moved into quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = welore.from_pretrained(tmp_path)
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]


def test_loading_a_dense_checkpoint_with_the_welore_loader_is_refused(tmp_path):
    _roberta().save_pretrained(tmp_path)
    with pytest.raises(InvalidConfigError, match="not a WeLore checkpoint"):
        welore.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------- Trainer


@pytest.mark.parametrize("kind", ["roberta", "llama"])
@pytest.mark.parametrize("use_callback", [False, True], ids=["optim-only", "callback"])
def test_trainer_trains_only_lrc_factors_and_n_lrc_is_unchanged(tmp_path, kind, use_callback):
    model, dataset = (_roberta(), classification_dataset()) if kind == "roberta" else (_llama(), lm_dataset())
    dense_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callbacks = [WeLoreCallback()] if use_callback else []
    trainer = make_trainer(model, _welore_args(tmp_path), dataset, callbacks=callbacks)
    if use_callback:
        assert welore.is_compressed(model)  # split at Trainer init, before the optimizer exists
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after < loss_before

    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is welore.WeLoreAdamW  # WeLore has its own optimizer classes since the restructure
    assert not any(g["low_rank"] for g in optimizer.param_groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert in_optimizer == {id(p) for p in trainable}
    lrc = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lrc and len(in_optimizer) == 2 * len(lrc)
    # Everything not factorized (N-LRCs, embeddings, norms, heads) is bit-identical after training.
    for name, param in model.named_parameters():
        if name in dense_before:
            assert torch.equal(param, dense_before[name]), name
    if use_callback:
        assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(
            model.config.quantization_config.ranks
        )


@pytest.mark.parametrize("use_callback", [True, False], ids=["callback", "optim-name-only"])
def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path, use_callback):
    # Both entry points split at Trainer init, before the checkpoint is loaded into the model.
    args = dict(max_steps=12, save_strategy="steps", save_steps=6, logging_steps=1)
    callbacks = [WeLoreCallback()] if use_callback else []
    model = _roberta()
    make_trainer(model, _welore_args(tmp_path / "run", **args), classification_dataset(), callbacks=callbacks).train()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed = _roberta()
    trainer = make_trainer(resumed, _welore_args(tmp_path / "run", **args), classification_dataset(),
                           callbacks=list(callbacks))  # fmt: skip
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert uninterrupted.keys() == dict(resumed.named_parameters()).keys()
    for n, p in resumed.named_parameters():
        assert torch.equal(p, uninterrupted[n]), n


def test_save_model_after_training_writes_a_loadable_factorized_checkpoint(tmp_path):
    model = _roberta()
    trainer = make_trainer(model, _welore_args(tmp_path, max_steps=4), classification_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    loaded = welore.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 99, (2, 12))
    model.eval()
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.skipif(not hf_galore.utils.imports.is_bitsandbytes_available(), reason="needs bitsandbytes")
def test_welore_adamw_8bit_trains(tmp_path):
    trainer = make_trainer(
        _roberta(),
        _welore_args(tmp_path, optim="welore_adamw_8bit", optim_args="target_compression=0.5, min_8bit_size=0"),
        classification_dataset(),
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before
    assert type(trainer.optimizer.optimizer) is welore.WeLoreAdamW8bit


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_analyze_compress_merge(tmp_path, capsys):
    model = _roberta()
    model.save_pretrained(tmp_path / "dense")
    assert main(["welore", "analyze", str(tmp_path / "dense"), "--target-compression", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "WeLore threshold" in out and "LRC" in out and "roberta.encoder.layer.0.attention.self.query" in out
    assert main(["welore", "analyze", str(tmp_path / "dense"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["compression"] - 0.5) < 0.05 and len(report["matrices"]) == 12

    assert main(["welore", "compress", str(tmp_path / "dense"), str(tmp_path / "small"),
                 "--target-compression", "0.5"]) == 0  # fmt: skip
    assert main(["welore", "merge", str(tmp_path / "small"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    small = welore.from_pretrained(tmp_path / "small")
    merged = RobertaForSequenceClassification.from_pretrained(tmp_path / "merged")  # plain transformers
    ids = torch.randint(3, 99, (2, 12))
    torch.testing.assert_close(merged(input_ids=ids).logits, small(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["welore", "merge", str(tmp_path / "dense"), str(tmp_path / "x")]) == 2
    assert "not a WeLore checkpoint" in capsys.readouterr().err


def test_cli_list_shows_welore_optimizers(capsys):
    assert main(["list", "--json"]) == 0
    by_name = {info["name"]: info for info in json.loads(capsys.readouterr().out)}
    knobs = {k["name"] for k in by_name["welore_adamw"]["optim_args"]}
    assert knobs == {"target_compression", "min_reduction", "train_norms", "train_biases", "train_embeddings",
                     "train_heads", "foreach"}  # fmt: skip
    assert by_name["welore_adamw_8bit"]["needs_bitsandbytes"] is True
    # WeLore's own optimizers (not GaLore's with an empty projected group)
    assert by_name["welore_adamw"]["optimizer_class"] == "hf_galore.WeLoreAdamW"
    assert by_name["welore_adamw_8bit"]["optimizer_class"] == "hf_galore.WeLoreAdamW8bit"


def test_from_pretrained_and_merge_take_the_q_galore_arguments(tmp_path):
    """`from_pretrained(path, model_class, dtype, device)` and `merge(model, dtype, *, inplace)`, as Q-GaLore's; the
    old `model_cls` keyword and positional `inplace` still work, with a FutureWarning."""
    import inspect

    from hf_galore.methods import q_galore

    for name in ("from_pretrained", "merge"):
        ours, theirs = inspect.signature(getattr(welore, name)), inspect.signature(getattr(q_galore, name))
        assert list(ours.parameters)[:4] == list(theirs.parameters)[:4]
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_roberta_config())
    welore.compress(model, WeLoreConfig(target_compression=0.3))
    model.save_pretrained(tmp_path)
    with pytest.warns(FutureWarning, match="'model_cls' is renamed 'model_class'"):
        loaded = welore.from_pretrained(tmp_path, model_cls=RobertaForSequenceClassification)
    assert type(loaded) is RobertaForSequenceClassification
    with pytest.warns(FutureWarning, match="inplace= by keyword"):
        copy = welore.merge(loaded, False)
    assert welore.is_compressed(loaded) and not welore.is_compressed(copy)
    factored = [n for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)]
    half = welore.merge(loaded, torch.float16)
    assert half is loaded and factored
    assert all(type(m := half.get_submodule(n)) is nn.Linear and m.weight.dtype == torch.float16 for n in factored)
