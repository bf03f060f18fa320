"""Shared fixtures: tiny models built from configs (odd sizes, offline), deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_galore  # noqa: F401  (registers the optimizers)

# One intra-op thread unless the caller set OMP_NUM_THREADS: the tiny test models gain nothing from more, and on a
# shared CPU OpenMP's spin-waiting made the small LAPACK calls (the SVD refreshes) about 10× slower with 2 threads.
# Results do not depend on it: every comparison in the suite is between runs made in the same setting.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses that the script and distributed tests start
    torch.set_num_threads(1)

#: The Linear modules of `tiny_roberta_config()` / `tiny_llama_config()` models that "all-linear" selects.
ROBERTA_ENCODER_LINEARS = {
    f"roberta.encoder.layer.{i}.{suffix}"
    for i in range(2)
    for suffix in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
}
LLAMA_LINEARS = {
    f"model.layers.{i}.{suffix}"
    for i in range(2)
    for suffix in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
}


def assert_close_on_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, msg=None) -> None:
    """Elementwise `actual ≈ expected` within `rtol` of each element and `rtol` of the tensor's largest magnitude.

    For fp32 trajectories computed in another operation order (a reference, a batched path, another x86 CPU's
    kernels): their round-off scales with the magnitudes involved, so a fixed absolute tolerance is too tight for an
    element near zero of a tensor of large values. An actually different trajectory (one more step, lr × 1.01) still
    fails: it moves the weights by ~lr per step, orders of magnitude above `rtol` × the weights' scale.
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖ / ‖reference‖, in float64 (the scale of each tensor, whatever its dtype)."""
    reference = reference.double()
    return float((value.double() - reference).norm() / reference.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_roberta_config(**overrides):
    from transformers import RobertaConfig

    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        architectures=["RobertaForSequenceClassification"],
    )
    values.update(overrides)
    return RobertaConfig(**values)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
    )
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def tiny_roberta():
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(tiny_roberta_config())


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture
def decomposition_dtypes(monkeypatch):
    """The dtypes in which GaLore's subspace decompositions run, recorded for the duration of a test."""
    from hf_galore.projection import subspace

    seen: list[torch.dtype] = []
    original = subspace.left_basis

    def spy(matrix, *args, **kwargs):
        result = original(matrix, *args, **kwargs)
        seen.append(result.dtype)
        return result

    monkeypatch.setattr(subspace, "left_basis", spy)
    return seen
