"""Shared fixtures: tiny models built from configs (odd sizes, offline), deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_galore  # noqa: F401  (registers the optimizers)
from hf_galore.utils.logging import reset_warnings


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    reset_warnings()
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
