"""Q-GaLore: quantizer, INT8 Linear, optimizer (INT4 bases, lazy refresh, INT8 update), Trainer, save/load, resume."""

from __future__ import annotations

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
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaForCausalLM,
    RobertaForSequenceClassification,
)

from hf_galore import REGISTRY, QGaLoreAdamW8bit, QGaLoreConfig
from hf_galore.builder import make_optimizer_kwargs
from hf_galore.errors import InvalidConfigError, UnsupportedSetupError
from hf_galore.methods.q_galore import from_pretrained, merge, merge_to_dense, quantize_model
from hf_galore.modules import Int8Linear
from hf_galore.projection import quant

Q_ARGS = "rank=4, update_proj_gap=4, scale=1, weight_group_size=64, proj_group_size=64"


# ---------------------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [7, 64, 1000])
def test_round_trip_error_is_at_most_half_a_step_per_group(bits, group_size):
    x = torch.randn(37, 29) * torch.linspace(0.01, 10, 29)  # groups with very different ranges
    codes, scales, zeros = quant.quantize(x, bits, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) <= 2**bits - 1
    assert scales.numel() == zeros.numel() == quant.num_groups(x.numel(), group_size)
    error = (quant.dequantize(codes, scales, zeros, group_size) - x).abs().reshape(-1)
    step = scales.repeat_interleave(group_size)[: x.numel()]
    assert bool((error <= step / 2 * (1 + 1e-4) + 1e-6).all())
    # The bound is tight enough to mean something: INT8 keeps ~2 more decimal digits than INT4.
    assert float(error.max()) <= float(scales.max())


@pytest.mark.parametrize("bits", [8, 4])
def test_single_sign_and_constant_groups_are_kept(bits):
    # The published quantizer clamps the zero point and turns [1, 2] into [1, 1] (unsloth#10841).
    for values in ([1.0, 2.0], [-5.0, -3.0, -4.0, -3.5], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0], [-7.25] * 3):
        x = torch.tensor(values)
        codes, scales, zeros = quant.quantize(x, bits, group_size=len(values))
        back = quant.dequantize(codes, scales, zeros, len(values))
        assert back.min() == x.min() and torch.allclose(back.max(), x.max(), rtol=1e-6), values
        if len(set(values)) <= 2:
            torch.testing.assert_close(back, x, rtol=1e-6, atol=0)


def test_int4_codes_are_packed_two_per_byte():
    codes = torch.tensor([1, 2, 3, 15, 0], dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.tolist() == [0x21, 0xF3, 0x00] and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed, (5,)), codes)
    basis = torch.randn(300, 16)
    q4, s4, z4 = quant.quantize_packed(basis, 4, 64)
    q8, _, _ = quant.quantize_packed(basis, 8, 64)
    assert q4.numel() == basis.numel() // 2 and q8.numel() == basis.numel()  # the saving is real
    q256, s256, _ = quant.quantize_packed(basis, 4, 256)  # the default group size
    assert basis.numel() * 4 / (q256.numel() + 8 * s256.numel()) > 7.4  # vs fp32, with the scales and zeros
    back = quant.dequantize_packed(q4, s4, z4, basis.shape, 4, 64)
    torch.testing.assert_close(back, quant.dequantize(quant.quantize(basis, 4, 64)[0], s4, z4, 64))


def test_stochastic_rounding_is_unbiased_and_seeded():
    # One group with codes 0 and 255 as anchors (scale exactly 1); 200k copies of 0.3 in between.
    x = torch.cat([torch.tensor([0.0, 255.0]), torch.full((200_000,), 0.3)])
    nearest = quant.dequantize(*quant.quantize(x, 8, x.numel()), x.numel())
    assert float((nearest[2:] - 0.3).mean()) == pytest.approx(-0.3, abs=1e-6)  # round-to-nearest loses it all
    g = torch.Generator().manual_seed(1)
    rounded = quant.dequantize(*quant.quantize(x, 8, x.numel(), generator=g), x.numel())
    assert set(rounded[2:].unique().tolist()) == {0.0, 1.0}
    # E[error] = 0; std of the mean is 0.46 / sqrt(2e5) ≈ 0.001, so 0.006 is a ~6σ bound, 50× below the RTN bias.
    assert abs(float((rounded[2:] - 0.3).mean())) < 0.006
    # Mean error over many draws of a generic tensor goes to 0 elementwise.
    w = torch.randn(64, 32)
    mean = (
        sum(
            quant.dequantize(*quant.quantize(w, 8, 64, generator=torch.Generator().manual_seed(s)), 64)
            for s in range(400)
        )
        / 400
    )
    step = quant.quantize(w, 8, 64)[1].max()
    assert float((mean - w).abs().max()) < 0.25 * float(step)
    assert float((mean - w).mean().abs()) < 0.01 * float(step)
    # Deterministic per seed, different across seeds.
    a = quant.quantize(w, 8, 64, generator=torch.Generator().manual_seed(7))[0]
    b = quant.quantize(w, 8, 64, generator=torch.Generator().manual_seed(7))[0]
    c = quant.quantize(w, 8, 64, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------- Int8Linear
def test_int8_linear_matches_the_dequantized_float_linear():
    linear = nn.Linear(37, 11)
    layer = Int8Linear.from_linear(linear, group_size=64)
    reference = nn.Linear(37, 11)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantize_weight())
        reference.bias.copy_(linear.bias)
    assert (reference.weight - linear.weight).abs().max() <= layer.weight_scales.max() / 2 + 1e-6
    x = torch.randn(3, 5, 37)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), reference(x2)
    torch.testing.assert_close(y1, y2)
    target = torch.randn_like(y1)
    (y1 * target).sum().backward()
    (y2 * target).sum().backward()
    grad = layer.grad_carrier.grad
    assert grad.shape == layer.qweight.shape == (11, 37) and grad.is_contiguous()
    torch.testing.assert_close(grad, reference.weight.grad)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    # The carrier costs one element, stays out of the state dict, and survives casts without materialising.
    assert layer.grad_carrier.stride() == (0, 0) and layer.grad_carrier.untyped_storage().nbytes() == 4
    assert set(layer.state_dict()) == {"qweight", "weight_scales", "weight_zeros", "bias"}
    layer.to(torch.bfloat16)
    assert layer.grad_carrier.dtype == torch.bfloat16 and layer.grad_carrier.stride() == (0, 0)
    assert layer.weight_scales.dtype == torch.float32 and layer.qweight.dtype == torch.uint8
    assert layer(torch.randn(2, 37, dtype=torch.bfloat16)).dtype == torch.bfloat16
    merged = layer.to_linear(torch.float32)
    assert type(merged) is nn.Linear and torch.equal(merged.weight, layer.dequantize_weight())


# ---------------------------------------------------------------------------------------------------- optimizer
def _stepped_llama(optim_args: str = Q_ARGS, lr: float = 1e-2):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    cls, kwargs = make_optimizer_kwargs(
        "q_galore_adamw_8bit", model, lr=lr, weight_decay=0.01, target_modules="all-linear", optim_args=optim_args
    )
    return model, cls(**kwargs)


def test_every_trainable_parameter_moves_after_one_step():
    model, optimizer = _stepped_llama()
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert len(int8) == 14 and isinstance(optimizer, QGaLoreAdamW8bit)
    assert not any(isinstance(m, nn.Linear) and n != "lm_head" for n, m in model.named_modules())
    floats = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("grad_carrier")}
    codes = {n: m.qweight.clone() for n, m in int8.items()}
    ids = torch.randint(0, 99, (4, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    unmoved = [n for n, p in model.named_parameters() if n in floats and torch.equal(p, floats[n])]
    unmoved += [n for n, m in int8.items() if torch.equal(m.qweight, codes[n])]
    assert unmoved == []
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(floats)


def _lazy_optimizer(**overrides):
    param = nn.Parameter(torch.zeros(48, 32))
    kwargs = dict(lr=1e-3, rank=4, update_proj_gap=1, queue_size=2, gamma_proj=2.0, max_proj_gap=8, svd="exact")
    kwargs.update(overrides)
    return param, QGaLoreAdamW8bit([{"params": [param], "low_rank": True}], **kwargs)


def _run(param, optimizer, gradients):
    gaps, refreshes = [], []
    for grad in gradients:
        param.grad = grad
        optimizer.step()
        gaps.append(optimizer.state[param]["proj_gap"])
        refreshes.append(optimizer.state[param]["refresh_count"])
    return gaps, refreshes


def test_lazy_refresh_grows_the_gap_of_a_stable_subspace_up_to_the_cap():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 4))
    v, _ = torch.linalg.qr(torch.randn(32, 4))
    core = u @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0])) @ v.T
    param, optimizer = _lazy_optimizer()
    # Flip the sign of the gradient every step: the leading vector flips too, |cos| stays ≈ 1.
    gaps, refreshes = _run(param, optimizer, [core * (-1) ** i + 0.01 * torch.randn(48, 32) for i in range(60)])
    assert max(gaps) == 8 and gaps[-1] == 8  # 1 → 2 → 4 → 8, and never past the cap
    assert sorted(set(gaps)) == [1, 2, 4, 8]
    assert refreshes[-1] < 20  # lazy: far fewer than the 60 an eager gap of 1 would do


def test_lazy_refresh_keeps_the_gap_of_a_rotating_subspace():
    torch.manual_seed(0)
    param, optimizer = _lazy_optimizer()
    gaps, refreshes = _run(param, optimizer, [torch.randn(48, 32) for _ in range(30)])
    assert set(gaps) == {1} and refreshes[-1] == 30
    assert float(optimizer.state[param]["cos_queue"].mean()) < 0.4


def test_bases_are_stored_packed_int4():
    _, optimizer = _stepped_llama()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.randn(p.shape)
    optimizer.step()
    low_rank = [s for s in optimizer.state.values() if s.get("side")]
    assert len(low_rank) == 14
    for state in low_rank:
        side = "left" if "proj_left_q" in state else "right"
        rows, cols = state[f"proj_{side}_rows"], state[f"proj_{side}_cols"]
        assert state[f"proj_{side}_q"].dtype == torch.uint8 and state[f"proj_{side}_q"].numel() * 2 == rows * cols
        assert state["weight_q"].dtype == torch.uint8


def test_a_carrier_s_value_is_its_int8_buffers():
    # What a data-parallel rank receives from rank 0 for a carrier (layer-wise DDP): the codes, scales and zeros,
    # not the carrier, a one-element view that no broadcast can write into.
    layer = Int8Linear.from_linear(nn.Linear(64, 32), group_size=64)
    optimizer = QGaLoreAdamW8bit(
        [{"params": [layer.grad_carrier], "low_rank": True}, {"params": [layer.bias]}], rank=8
    )
    values = optimizer._value_tensors(layer.grad_carrier)
    assert [v.data_ptr() for v in values] == [
        t.data_ptr() for t in (layer.qweight, layer.weight_scales, layer.weight_zeros)
    ]
    assert optimizer._value_tensors(layer.bias)[0].data_ptr() == layer.bias.data_ptr()


def test_config_validation_and_unsupported_setups(tmp_path):
    with pytest.raises(InvalidConfigError, match="proj_bits=3"):
        QGaLoreConfig(proj_bits=3)
    with pytest.raises(InvalidConfigError, match="gamma_proj"):
        QGaLoreConfig(gamma_proj=0.5)
    with pytest.raises(InvalidConfigError, match="max_proj_gap=2"):
        _lazy_optimizer(update_proj_gap=4, max_proj_gap=2)
    from hf_galore.methods.q_galore.spec import check_setup

    class TwoProcesses:
        optim = "q_galore_adamw_8bit"
        world_size = 2
        fsdp = ""

    # Both names run under DDP (see test_distributed.py); FSDP is refused with Q-GaLore's reason and what works.
    for name in ("q_galore_adamw_8bit", "q_galore_adamw_8bit_layerwise"):
        TwoProcesses.optim = name
        check_setup(TwoProcesses())
    TwoProcesses.fsdp = "full_shard"
    with pytest.raises(UnsupportedSetupError, match=r"buffers.*FSDP2.*DDP.*q_galore_adamw_8bit.*galore_adamw_8bit"):
        check_setup(TwoProcesses())
    assert {"q_galore_adamw_8bit", "q_galore_adamw_8bit_layerwise"} <= set(REGISTRY)


# ---------------------------------------------------------------------------------------------------- Trainer
@pytest.mark.parametrize(
    ("kind", "name"), [("llama", "q_galore_adamw_8bit"), ("roberta", "q_galore_adamw_8bit_layerwise")]
)
def test_trainer_end_to_end_save_load_and_merge(tmp_path, kind, name):
    torch.manual_seed(0)
    if kind == "llama":
        model, dataset = LlamaForCausalLM(tiny_llama_config()), lm_dataset(n=48)
    else:
        model, dataset = RobertaForSequenceClassification(tiny_roberta_config()), classification_dataset(n=48)
    args = training_args(tmp_path, name, optim_args=Q_ARGS, max_steps=12, learning_rate=1e-2, logging_steps=6)
    trainer = make_trainer(model, args, dataset)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before
    assert type(trainer.optimizer.optimizer) is REGISTRY[name].optimizer_cls
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == (14 if kind == "llama" else 12)

    trainer.save_model(str(tmp_path / "out"))
    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(str(tmp_path / "out"))  # the stock call (#14): INT8 Linears, bit for bit
    assert [(n, type(m)) for n, m in reloaded.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    assert list(reloaded.state_dict()) == list(model.state_dict())
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    inputs = dataset[:4]
    inputs = {k: torch.tensor(v) for k, v in inputs.items() if k == "input_ids"}
    model.eval()
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    eval_args = training_args(tmp_path / "eval", "adamw_torch")
    assert make_trainer(reloaded, eval_args, dataset).evaluate()["eval_loss"] == after
    wrapped = from_pretrained(str(tmp_path / "out"))  # the thin wrapper loads the same
    assert all(torch.equal(t, reloaded.state_dict()[k]) for k, t in wrapped.state_dict().items())

    expected = {n: m.dequantize_weight() for n, m in reloaded.named_modules() if isinstance(m, Int8Linear)}
    merged = merge(reloaded)
    assert not any(isinstance(m, Int8Linear) for m in merged.modules())
    for n, weight in expected.items():
        assert type(merged.get_submodule(n)) is nn.Linear and torch.equal(merged.get_submodule(n).weight, weight)
    merged_loss = make_trainer(merged, eval_args, dataset).evaluate()["eval_loss"]
    assert merged_loss == pytest.approx(after, rel=1e-5)  # dense matmul: another fp32 operation order
    merged.save_pretrained(tmp_path / "dense")
    assert_stock_load_without_hf_galore(auto.__name__, tmp_path / "out", "hf_galore_q_galore", tmp_path / "dense")


def test_resume_equals_uninterrupted_training_bitwise(tmp_path):
    run = dict(optim_args=Q_ARGS, max_steps=8, save_strategy="steps", save_steps=5, logging_steps=1)

    def fresh():
        torch.manual_seed(0)
        return RobertaForSequenceClassification(tiny_roberta_config())

    dataset = classification_dataset(n=48)
    model = fresh()
    make_trainer(model, training_args(tmp_path, "q_galore_adamw_8bit", **run), dataset).train()
    uninterrupted = model.state_dict()

    resumed = fresh()  # plain Linears: Trainer(...) makes them INT8 before train() loads the checkpoint into them
    trainer = make_trainer(resumed, training_args(tmp_path, "q_galore_adamw_8bit", **run), dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    state = resumed.state_dict()
    assert list(state) == list(uninterrupted)
    for key, value in state.items():
        assert torch.equal(value, uninterrupted[key]), key

    saved = torch.load(tmp_path / "checkpoint-5" / "optimizer.pt", weights_only=True)
    entry = next(s for s in saved["state"].values() if "proj_left_q" in s or "proj_right_q" in s)
    assert entry["weight_q"].dtype == torch.uint8 and isinstance(entry["proj_gap"], int)
    assert isinstance(entry["cos_queue"], torch.Tensor)


def test_quantize_model_is_idempotent_and_rejects_tied_weights():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert len(quantize_model(model, "all-linear")) == 14
    assert quantize_model(model, "all-linear") == []
    assert model.config.quantization_config.quant_method == "hf_galore_q_galore"
    assert set(model.config.quantization_config.modules) == {
        n for n, m in model.named_modules() if isinstance(m, Int8Linear)
    }
    with pytest.raises(InvalidConfigError, match="tied"):
        quantize_model(LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)), ["lm_head"])


# ---------------------------------------------------------------------------------------------------- refused runs
def _without_bitsandbytes(monkeypatch):
    from hf_galore.utils import imports

    monkeypatch.setattr(imports, "is_bitsandbytes_available", lambda: False)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no_bitsandbytes", "MissingDependencyError", "bitsandbytes"),
        ("basis_bits", "InvalidConfigError", "proj_bits"),
        ("bad_beta", "InvalidConfigError", "betas"),
        ("fsdp", "UnsupportedSetupError", "cannot run under FSDP"),
        ("layerwise_fp16", "UnsupportedSetupError", "fp16"),
        ("layerwise_data_parallel", "UnsupportedSetupError", "DataParallel"),
    ],
)
def test_a_refused_run_leaves_the_model_untouched(tmp_path, monkeypatch, case, error, match):
    """Every check that can refuse the run runs before the INT8 surgery (#14): a retry gets the model it passed."""
    import hf_galore.errors

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    snapshot = snapshot_model(model)
    name, overrides = "q_galore_adamw_8bit", {}
    if case == "no_bitsandbytes":
        _without_bitsandbytes(monkeypatch)
    elif case == "basis_bits":
        overrides["optim_args"] = Q_ARGS + ", basis_bits=4"
    elif case == "bad_beta":
        overrides["adam_beta2"] = 1.5
    elif case == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # how `accelerate launch` passes an FSDP config
    elif case == "layerwise_fp16":
        name, overrides["fp16"] = "q_galore_adamw_8bit_layerwise", True
    else:
        from transformers import TrainingArguments

        name = "q_galore_adamw_8bit_layerwise"
        monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    args = training_args(tmp_path, name, **{"optim_args": Q_ARGS, **overrides})
    with pytest.raises(getattr(hf_galore.errors, error), match=match):
        make_trainer(model, args, lm_dataset(n=8)).train()
    assert_model_unchanged(model, snapshot)


def test_bf16_checkpoint_loads_bit_for_bit_and_cast_scales_are_read_again(tmp_path):
    """fp32 scales/zeros of a bf16 model survive the stock load; transformers 4.x casts them to bf16 while loading,
    which the format's finishing step repairs from the checkpoint (simulated here on the installed version)."""
    from hf_galore.methods.q_galore import transform

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    quantize_model(model, "all-linear", weight_group_size=64)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    for key, tensor in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == tensor.dtype and torch.equal(loaded.state_dict()[key], tensor), key
    layer = loaded.model.layers[1].mlp.down_proj
    stored = layer.weight_scales.clone()
    layer.weight_scales.data = stored.to(torch.bfloat16)  # what transformers 4.x does to every float tensor
    assert not torch.equal(layer.weight_scales.float(), stored)
    transform._finish(loaded, loaded.config.quantization_config.record())
    assert layer.weight_scales.dtype == torch.float32 and torch.equal(layer.weight_scales, stored)


def test_merge_to_dense_is_a_deprecated_alias_of_merge():
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_model(model, ["0"], weight_group_size=16)
    copy = merge(model, inplace=False)  # the same name and arguments as hf_galore.welore.merge
    assert isinstance(model[0], Int8Linear) and type(copy[0]) is nn.Linear
    with pytest.warns(FutureWarning, match="merge_to_dense is renamed"):
        merged = merge_to_dense(model, torch.float32)
    assert merged is model and type(model[0]) is nn.Linear and torch.equal(model[0].weight, copy[0].weight)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_checkpoint_tensors_are_read_from_either_format(tmp_path, safe):
    from hf_galore import loading

    model = LlamaForCausalLM(tiny_llama_config())
    quantize_model(model, "all-linear", weight_group_size=64)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    key = "model.layers.0.mlp.down_proj.weight_scales"
    (tensor,) = loading.read_checkpoint_tensors(tmp_path, [key]).values()
    assert torch.equal(tensor, model.state_dict()[key])
    with pytest.raises(InvalidConfigError, match="has no tensor"):
        loading.read_checkpoint_tensors(tmp_path, ["nope"])
