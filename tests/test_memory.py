"""The memory estimator: predicted optimizer-state and weight bytes equal what one real step allocates."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
from conftest import tiny_llama_config, tiny_roberta_config
from transformers import LlamaForCausalLM, RobertaForSequenceClassification, TrainingArguments

import hf_galore
from hf_galore.cli import main
from hf_galore.errors import InvalidConfigError, UnknownOptimizerError, UnsupportedSetupError
from hf_galore.memory import MemoryEstimate, estimate_memory, row_sharded_param_bytes, shard_rows
from hf_galore.memory import optimizer_state_bytes as measured_state_bytes
from hf_galore.modules.int8_linear import Int8Linear
from hf_galore.optim.base import LowRankOptimizer
from hf_galore.utils.imports import is_bitsandbytes_available

needs_bnb = pytest.mark.skipif(not is_bitsandbytes_available(), reason="needs bitsandbytes")

MODELS = {
    "llama": (tiny_llama_config, LlamaForCausalLM),
    "roberta": (tiny_roberta_config, RobertaForSequenceClassification),
}

CASES = [
    ("adamw_torch", None),
    ("galore_adamw", "rank=4"),
    ("galore_adamw", "rank=4, proj_type=full"),
    pytest.param("galore_adamw_8bit", "rank=4, min_8bit_size=0", marks=needs_bnb),
    pytest.param("galore_adamw_8bit", "rank=4", marks=needs_bnb),
    pytest.param("galore_adamw_8bit", "rank=4, min_8bit_size=0, basis_bits=8, basis_group_size=16", marks=needs_bnb),
    ("galore_adamw", "rank=4, basis_bits=4, basis_group_size=48"),
    ("galore_adafactor", "rank=4"),
    ("galore_adafactor", "rank=4, beta1=0.9"),
    ("galore_adamw_layerwise", "rank=4, svd=exact"),
    pytest.param(
        "q_galore_adamw_8bit", "rank=4, min_8bit_size=0, proj_group_size=16, weight_group_size=16", marks=needs_bnb
    ),
    ("flora_adamw", "rank=4"),
    ("flora_adamw", "rank=4, proj_type=reverse_std, foreach=false"),
    ("flora_adafactor", "rank=4"),
    ("flora_adafactor", "rank=4, beta1=0"),
    ("flora_adamw_layerwise", "rank=4"),
]


def measured_weight_bytes(model: torch.nn.Module) -> int:
    """Storage bytes of the unique parameters (a carrier's one element) plus Q-GaLore's INT8 weight buffers."""
    total = sum(p.untyped_storage().nbytes() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += module.qweight.numel() + 4 * (module.weight_scales.numel() + module.weight_zeros.numel())
    return total


def one_real_step(model_key: str, optim: str, optim_args: str | None, dtype: torch.dtype):
    config_fn, model_cls = MODELS[model_key]
    torch.manual_seed(0)
    model = model_cls(config_fn()).to(dtype)
    if optim == "adamw_torch":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        args = TrainingArguments(
            "unused", optim_target_modules="all-linear", optim_args=optim_args, use_cpu=True, report_to=[]
        )
        optimizer_cls, kwargs = hf_galore.optimizer_cls_and_kwargs(args, model, optim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = optimizer_cls(**kwargs)
    ids = torch.randint(0, 99, (2, 8))
    labels = ids if model_key == "llama" else torch.tensor([0, 1])
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()  # layer-wise optimizers already stepped in their hooks; this is then a no-op for them
    return model, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize(("optim", "optim_args"), CASES)
def test_predicted_state_and_weight_bytes_equal_the_measured_ones(model_key, optim, optim_args, dtype):
    model, optimizer = one_real_step(model_key, optim, optim_args, dtype)
    estimate = estimate_memory(MODELS[model_key][0](), optim, optim_args=optim_args, dtype=dtype, batch=2, seq=8)
    assert estimate.state_bytes == measured_state_bytes(optimizer)
    assert estimate.weights == measured_weight_bytes(model)


def test_estimate_builds_nothing_and_counts_parameters():
    estimate = estimate_memory(tiny_llama_config(), "galore_adamw", rank=4, batch=2, seq=8)
    model = LlamaForCausalLM(tiny_llama_config())
    assert estimate.num_parameters == sum(p.numel() for p in model.parameters())
    assert estimate.num_projected == 15  # galore_* follows transformers' all-linear: lm_head included
    assert estimate.gradients == estimate.weights  # fp32, everything trainable, not layer-wise
    assert estimate.activations > 0
    assert estimate.total_peak >= estimate.weights + estimate.state_bytes + estimate.gradients
    assert "optimizer states" in estimate.table() and "approx" in estimate.table()


def test_layerwise_keeps_one_gradient_and_accumulators():
    plain = estimate_memory(tiny_llama_config(), "galore_adamw", rank=4)
    layerwise = estimate_memory(tiny_llama_config(), "galore_adamw", rank=4, layerwise=True, max_grad_norm=0)
    assert layerwise.optim == "galore_adamw_layerwise" and layerwise.layerwise
    model = LlamaForCausalLM(tiny_llama_config())
    largest = max(p.numel() for p in model.parameters()) * 4
    assert layerwise.gradients == largest < plain.gradients
    accumulating = estimate_memory(
        tiny_llama_config(), "galore_adamw_layerwise", rank=4, gradient_accumulation_steps=4, max_grad_norm=0
    )
    assert accumulating.gradients > layerwise.gradients
    assert layerwise.state_bytes == plain.state_bytes
    # With clipping (the Trainer's default) every prepared gradient waits for step(): projected ones for the
    # targets (rank 4 × the larger side), full ones for every other parameter.
    clipping = estimate_memory(tiny_llama_config(), "galore_adamw_layerwise", rank=4)
    held = sum(
        4 * max(p.shape) if p.dim() == 2 and ("proj" in name or name == "lm_head.weight") else p.numel()
        for name, p in model.named_parameters()
    )
    assert clipping.gradients == largest + held * 4


def test_randomized_refresh_workspace_is_smaller_than_exact_svd():
    config = tiny_llama_config(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8)
    randomized = estimate_memory(config, "galore_adamw", rank=8)
    exact = estimate_memory(config, "galore_adamw", rank=8, optim_args="svd=exact")
    assert randomized.refresh_transient == 4 * 2 * (256 + 688) * 40
    assert exact.refresh_transient == 4 * 256 * (256 + 688 + 1)


def test_gradient_checkpointing_lowers_activations():
    full = estimate_memory(tiny_llama_config(), "adamw_torch", batch=4, seq=32)
    checkpointed = estimate_memory(tiny_llama_config(), "adamw_torch", batch=4, seq=32, grad_checkpointing=True)
    assert checkpointed.activations < full.activations


def test_adamw_8bit_baseline_counts_bitsandbytes_blocks():
    config = tiny_llama_config(hidden_size=128, intermediate_size=256)
    estimate = estimate_memory(config, "adamw_8bit")
    model = LlamaForCausalLM(config)
    expected = 2 * 256 * 4
    for p in model.parameters():
        n = p.numel()
        expected += 8 * n if n < 4096 else 2 * (n + 4 * math.ceil(n / 256))
    assert estimate.state_bytes == expected


def test_bad_inputs_name_the_value_and_the_choices():
    with pytest.raises(UnknownOptimizerError, match=r"galore_adamx.*galore_adamw.*adamw_torch"):
        estimate_memory(tiny_llama_config(), "galore_adamx")
    with pytest.raises(UnsupportedSetupError, match=r"welore_adamw.*welore analyze"):
        estimate_memory(tiny_llama_config(), "welore_adamw")
    with pytest.raises(InvalidConfigError, match="dtype='int3'"):
        estimate_memory(tiny_llama_config(), "galore_adamw", dtype="int3")
    with pytest.raises(InvalidConfigError, match=r"layerwise=True.*adamw_torch"):
        estimate_memory(tiny_llama_config(), "adamw_torch", layerwise=True)
    with pytest.raises(InvalidConfigError, match="ranq"):
        estimate_memory(tiny_llama_config(), "galore_adamw", optim_args="ranq=4")


def test_cli_estimate_memory(tmp_path, capsys):
    tiny_llama_config().save_pretrained(tmp_path)
    argv = ["estimate-memory", str(tmp_path), "--optim", "galore_adamw", "--rank", "4", "--batch", "2"]
    assert main([*argv, "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "LlamaForCausalLM" in out
    assert main([*argv, "--seq", "8", "--json", "--dtype", "bf16", "--layerwise"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate_memory(tiny_llama_config(), "galore_adamw_layerwise", rank=4, batch=2, seq=8, dtype="bf16")
    assert data["state_bytes"] == expected.state_bytes and data["optim"] == "galore_adamw_layerwise"
    assert main(["estimate-memory", "--model", str(tmp_path), "--optim", "nope"]) == 2  # --model: the same
    assert "Choices:" in capsys.readouterr().err
    # The same model form as check-targets: positional, or --model (kept for scripts), not two different ones.
    assert main(["estimate-memory", "--model", str(tmp_path), "--optim", "galore_adamw", "--rank", "4"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert main(["estimate-memory", str(tmp_path), "--model", "other", "--optim", "galore_adamw"]) == 2
    assert "two models" in capsys.readouterr().err
    assert main(["estimate-memory", "--optim", "galore_adamw"]) == 2
    assert "hf-galore estimate-memory MODEL_DIR_OR_CONFIG" in capsys.readouterr().err


def test_memory_estimate_to_dict_round_trip():
    estimate = estimate_memory(tiny_roberta_config(), "galore_adafactor", rank=4)
    data = estimate.to_dict()
    assert data["total_peak"] == estimate.total_peak
    fields = {k: v for k, v in data.items() if k not in ("state_bytes", "total_peak")}
    assert MemoryEstimate(**fields) == estimate


def test_measured_state_bytes_count_each_storage_once_including_projector_objects_and_not_int8_weights():
    class Projector:  # galore-torch keeps its basis on an object in the state
        def __init__(self, matrix):
            self.ortho_matrix = matrix
            self.rank = 4

    basis = torch.zeros(8, 4)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    optimizer.state["a"] = {"exp_avg": torch.zeros(10), "projector": Projector(basis), "step": 3}
    optimizer.state["b"] = {"shared": basis, "codes": torch.zeros(16, dtype=torch.uint8)}
    assert measured_state_bytes(optimizer) == 10 * 4 + 8 * 4 * 4 + 16
    optimizer.state["c"] = {"weight_q": torch.zeros(64, dtype=torch.uint8), "weight_scales": torch.zeros(4)}
    assert measured_state_bytes(optimizer) == 10 * 4 + 8 * 4 * 4 + 16  # Q-GaLore's INT8 weights are weights


def test_step_workspace_follows_the_chunking_rule(monkeypatch):
    config = tiny_llama_config(hidden_size=64, intermediate_size=96)
    sizes, projected_sizes = [], []
    model = LlamaForCausalLM(config)
    for name, p in model.named_parameters():
        # galore_* names follow transformers' all-linear, which includes lm_head.
        projected = p.dim() == 2 and ("proj" in name or name == "lm_head.weight") and min(p.shape) > 8
        sizes.append(8 * max(p.shape) if projected else p.numel())
        projected_sizes += [8 * max(p.shape)] if projected else []
    batched = estimate_memory(config, "galore_adamw", rank=8)
    looped = estimate_memory(config, "galore_adamw", rank=8, optim_args="foreach=false")
    eight_bit = estimate_memory(config, "galore_adamw_8bit", rank=8)
    assert looped.step_workspace == sum(sizes) * 4 + max(sizes) * 8  # prepared as a chunk, updated one by one
    assert batched.step_workspace == sum(sizes) * (4 + 8)  # the whole tiny model fits in one chunk
    assert eight_bit.step_workspace == sum(sizes) * (4 + 8 + 10)
    # Chunks of 10 elements: projected weights alone, plain parameters (the embedding) in slices of 10.
    monkeypatch.setattr(LowRankOptimizer, "foreach_chunk_elements", 10)
    assert estimate_memory(config, "galore_adamw", rank=8).step_workspace == max(projected_sizes) * (4 + 8)
    assert batched.total_peak >= batched.weights + batched.state_bytes + batched.gradients + batched.step_workspace


def test_flora_is_estimated_with_its_own_rules():
    estimate = estimate_memory(tiny_llama_config(), "flora_adamw", rank=4)
    assert estimate.num_projected > 0 and estimate.projection_bases == 0  # seeded projections: nothing stored
    galore = estimate_memory(tiny_llama_config(), "galore_adafactor", rank=4)
    assert estimate.rank == 4 and galore.projection_bases > 0
    with pytest.raises(InvalidConfigError, match="rank=64 exceeds"):
        estimate_memory(tiny_llama_config(), "flora_adamw", rank=64)


@pytest.mark.parametrize("optim", ["welore_adamw", pytest.param("welore_adamw_8bit", marks=needs_bnb)])
def test_welore_checkpoint_is_estimated_as_adamw_over_its_trainable_factors(tmp_path, optim):
    from hf_galore import welore

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_roberta_config())
    welore.compress(model, welore.WeLoreConfig(target_compression=0.3))
    model.save_pretrained(tmp_path)
    optim_args = "min_8bit_size=0" if optim.endswith("8bit") else None
    estimate = estimate_memory(tmp_path, optim, optim_args=optim_args, batch=2, seq=8)  # the split, on meta

    loaded = welore.from_pretrained(tmp_path).train()
    args = TrainingArguments("unused", optim_target_modules="all-linear", optim_args=optim_args, use_cpu=True)
    optimizer_cls, kwargs = hf_galore.optimizer_cls_and_kwargs(args, loaded, optim)
    optimizer = optimizer_cls(**kwargs)
    loaded(input_ids=torch.randint(0, 99, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert estimate.state_bytes == measured_state_bytes(optimizer)
    assert estimate.weights == measured_weight_bytes(loaded)
    assert estimate.gradients == 4 * sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    # A dense model cannot be split without its weights: refused, naming what works instead.
    with pytest.raises(UnsupportedSetupError, match="WeLore checkpoint"):
        estimate_memory(tiny_roberta_config(), optim)


# ------------------------------------------------------------------------------------------------------------ FSDP2
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shard_rows_is_torch_chunks_split(world_size):
    for rows in range(20):
        chunks = [c.shape[0] for c in torch.arange(rows).chunk(world_size)] if rows else []
        assert shard_rows(rows, world_size) == chunks + [0] * (world_size - len(chunks))


def test_row_sharded_param_bytes_arithmetic():
    from hf_galore import FloraAdamW, GaLoreAdamW, GaLoreAdamW8bit

    settings = {**GaLoreAdamW.low_rank_defaults(), **GaLoreAdamW.inner_defaults, "rank": 4}
    # 32×64 (wide: one process' std projects it on the left, with r×n moments) sharded 16 + 16: right side, m_k×r
    # fp32 moments, Q (64×4) whole on each process.
    cost = row_sharded_param_bytes(GaLoreAdamW, (32, 64), settings, torch.float32, True, 16)
    assert (cost.states, cost.bases, cost.weights, cost.projected) == (2 * 16 * 4 * 4, 64 * 4 * 4, 16 * 64 * 4, True)
    # With more rows than the rank, the class's rule on the shard's shape, right side (the refresh workspace, an
    # estimate, takes the sketch width min(rank + oversample, n) of a tall shard).
    on_shard = GaLoreAdamW.param_bytes((16, 64), {**settings, "proj_type": "right"}, torch.bfloat16, True)
    sharded = row_sharded_param_bytes(GaLoreAdamW, (32, 64), settings, torch.bfloat16, True, 16)
    assert dataclasses.replace(sharded, refresh=0) == dataclasses.replace(on_shard, refresh=0)
    assert sharded.refresh == 4 * 2 * (16 + 64) * (4 + 32) + 4 * 16 * 64  # fp32 sketches + fp32 copy of the rows
    # A shard with no more rows than the rank, or none, of a projected weight: still projected (global shape).
    for rows in (4, 3, 0):
        cost = row_sharded_param_bytes(GaLoreAdamW, (9, 32), settings, torch.float32, True, rows)
        assert (cost.states, cost.bases, cost.projected) == (2 * rows * 4 * 4, 32 * 4 * 4, True)
    # Non-projected parameters: the plain rule on the local rows (param dtype), a 0-d one whole.
    assert row_sharded_param_bytes(GaLoreAdamW, (9,), settings, torch.bfloat16, False, 5).states == 2 * 5 * 2
    assert row_sharded_param_bytes(GaLoreAdamW, (), settings, torch.float32, False, 0).states == 2 * 4

    eight = {**GaLoreAdamW8bit.low_rank_defaults(), **GaLoreAdamW8bit.inner_defaults, "rank": 4, "block_size": 64}
    # Blocks of the local shard: 5×4 = 20 codes in one block of 64 per moment.
    cost = row_sharded_param_bytes(GaLoreAdamW8bit, (9, 32), {**eight, "min_8bit_size": 0}, torch.float32, True, 5)
    assert cost.states == 2 * (20 + 4 * 1)
    cost = row_sharded_param_bytes(GaLoreAdamW8bit, (64, 24), {**eight, "min_8bit_size": 0}, torch.float32, True, 32)
    assert cost.states == 2 * (128 + 4 * 2)
    # 8-bit or fp32 is decided on the global size (9×4 = 36), whatever the shard's.
    for threshold, expected in ((36, 2 * (16 + 4)), (37, 2 * 16 * 4)):
        at = {**eight, "min_8bit_size": threshold}
        assert row_sharded_param_bytes(GaLoreAdamW8bit, (9, 32), at, torch.float32, True, 4).states == expected

    flora = {**FloraAdamW.low_rank_defaults(), **FloraAdamW.inner_defaults, "rank": 4}
    # Compressed momentum m_k×r and row statistics m_k local, column statistics n replicated; nothing stored as a basis.
    for rows in (5, 4, 0):
        cost = row_sharded_param_bytes(FloraAdamW, (9, 32), flora, torch.float32, True, rows)
        assert (cost.states, cost.bases) == (4 * (rows * 4 + rows + 32), 0)


def test_fsdp2_estimate_is_per_process_and_adds_up():
    config = tiny_llama_config(hidden_size=64, intermediate_size=96, vocab_size=101)
    one = estimate_memory(config, "galore_adamw", rank=8, optim_args="proj_type=right")
    sharded = estimate_memory(config, "galore_adamw", rank=8, fsdp2=True, world_size=3)
    assert sharded.fsdp2 and sharded.world_size == 3 and len(sharded.per_process_state_bytes) == 3
    # Process 0 holds ceil(m / 3) rows of everything: the largest. The moments add up to one process' (right side);
    # the bases are on every process.
    assert sharded.state_bytes == sharded.per_process_state_bytes[0] == max(sharded.per_process_state_bytes)
    bases = sharded.projection_bases
    assert bases == one.projection_bases
    assert sum(b - bases for b in sharded.per_process_state_bytes) == one.optimizer_states
    assert sharded.num_parameters == one.num_parameters and sharded.num_projected == one.num_projected
    assert sharded.weights == sharded.gradients < one.weights  # process 0: ceil(m / 3) rows of every parameter
    # One process under FSDP2 is the one-process estimate on the right side.
    alone = estimate_memory(config, "galore_adamw", rank=8, fsdp2=True)
    assert alone.state_bytes == one.state_bytes and alone.per_process_state_bytes == [one.state_bytes]
    assert "FSDP2 on 3 processes" in sharded.table() and "per process" in sharded.table()
    torch_adamw = estimate_memory(config, "adamw_torch", fsdp2=True, world_size=3)
    assert torch_adamw.state_bytes == 2 * torch_adamw.weights + 4 * len(list(LlamaForCausalLM(config).parameters()))


def test_fsdp2_refusals_name_what_works():
    config = tiny_llama_config()
    for optim in ("galore_adamw_layerwise", "galore_adafactor_layerwise", "flora_adamw_layerwise"):
        with pytest.raises(UnsupportedSetupError, match=r"does not step on FSDP2.*galore_adamw, galore_adamw_8bit"):
            estimate_memory(config, optim, rank=4, fsdp2=True, world_size=2)
    with pytest.raises(UnsupportedSetupError, match="gradient_accumulation_steps > 1"):
        estimate_memory(config, "flora_adamw", rank=4, fsdp2=True, world_size=2, gradient_accumulation_steps=2)
    with pytest.raises(UnsupportedSetupError, match="proj_type='left'"):
        estimate_memory(config, "galore_adamw", rank=4, optim_args="proj_type=left", fsdp2=True, world_size=2)
    with pytest.raises(UnsupportedSetupError, match="svd='exact'"):
        estimate_memory(config, "galore_adamw", rank=4, optim_args="svd=exact", fsdp2=True, world_size=2)
    with pytest.raises(UnsupportedSetupError, match="adamw_8bit"):
        estimate_memory(config, "adamw_8bit", fsdp2=True, world_size=2)
    with pytest.raises(InvalidConfigError, match=r"world_size=2 without fsdp2.*--fsdp2"):
        estimate_memory(config, "galore_adamw", rank=4, world_size=2)
    with pytest.raises(InvalidConfigError, match="world_size must be a positive integer"):
        estimate_memory(config, "galore_adamw", rank=4, world_size=0, fsdp2=True)


def test_fsdp2_support_follows_the_class_flag(monkeypatch):
    from hf_galore import GaLoreAdamWLayerwise

    monkeypatch.setattr(GaLoreAdamWLayerwise, "supports_row_sharding", True)
    estimate = estimate_memory(tiny_llama_config(), "galore_adamw_layerwise", rank=4, fsdp2=True, world_size=2)
    assert len(estimate.per_process_state_bytes) == 2
    with pytest.raises(UnsupportedSetupError, match=r"names that do: .*galore_adamw_layerwise"):
        estimate_memory(tiny_llama_config(), "q_galore_adamw_8bit", rank=4, fsdp2=True, world_size=2)
    monkeypatch.undo()
    # The Adafactor names step on row shards (their classes say so): estimated, not refused.
    for optim in ("galore_adafactor", "flora_adafactor"):
        estimate = estimate_memory(tiny_llama_config(), optim, rank=4, fsdp2=True, world_size=2)
        assert estimate.per_process_state_bytes[0] >= estimate.per_process_state_bytes[1] > 0


def test_cli_estimate_memory_fsdp2(tmp_path, capsys):
    tiny_llama_config().save_pretrained(tmp_path)
    argv = ["estimate-memory", str(tmp_path), "--optim", "galore_adamw", "--rank", "4", "--fsdp2", "--world-size"]
    assert main([*argv, "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = estimate_memory(tiny_llama_config(), "galore_adamw", rank=4, fsdp2=True, world_size=2)
    assert data["per_process_state_bytes"] == expected.per_process_state_bytes and data["fsdp2"] is True
    assert main([*argv[:-2], "--world-size", "2"]) == 2  # without --fsdp2
    assert "without fsdp2" in capsys.readouterr().err
