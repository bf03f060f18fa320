"""Target selection with PEFT semantics."""

from __future__ import annotations

import logging

import pytest
from conftest import LLAMA_LINEARS, ROBERTA_ENCODER_LINEARS
from torch import nn

from hf_galore.errors import NoTargetModulesError
from hf_galore.targeting import log_resolution, resolve_target_modules, summarize_names


def test_all_linear_excludes_the_classifier_head(tiny_roberta):
    assert set(resolve_target_modules(tiny_roberta, "all-linear").names) == ROBERTA_ENCODER_LINEARS
    with_heads = set(resolve_target_modules(tiny_roberta, "all_linear", include_heads=True).names)
    assert with_heads == ROBERTA_ENCODER_LINEARS | {"classifier.dense", "classifier.out_proj"}


def test_all_linear_excludes_lm_head(tiny_llama):
    assert set(resolve_target_modules(tiny_llama, "all-linear").names) == LLAMA_LINEARS


def test_string_is_a_fullmatch_regex(tiny_llama):
    names = resolve_target_modules(tiny_llama, r".*\.(q_proj|v_proj)").names
    assert set(names) == {n for n in LLAMA_LINEARS if n.endswith(("q_proj", "v_proj"))}
    # fullmatch, not search: "q_proj" alone matches nothing.
    with pytest.raises(NoTargetModulesError):
        resolve_target_modules(tiny_llama, "q_proj")


def test_list_is_exact_name_or_dot_suffix(tiny_roberta):
    names = resolve_target_modules(tiny_roberta, ["query", "attention.output.dense"]).names
    assert set(names) == {n for n in ROBERTA_ENCODER_LINEARS if n.endswith(("query", "attention.output.dense"))}
    # "output.dense" as a suffix matches both the attention output and the FFN output, like PEFT.
    assert len(resolve_target_modules(tiny_roberta, ["output.dense"]).names) == 4
    # No substring matching: "quer" is not a suffix after a dot.
    with pytest.raises(NoTargetModulesError):
        resolve_target_modules(tiny_roberta, ["quer"])


def test_non_linear_matches_are_skipped_and_reported_once(tiny_llama, caplog):
    resolution = resolve_target_modules(tiny_llama, r"model\.layers\.\d+\.(self_attn|mlp)(\..*)?")
    assert set(resolution.names) == LLAMA_LINEARS
    skipped = dict(resolution.skipped)
    assert "model.layers.0.self_attn" in skipped and "not an nn.Linear" in skipped["model.layers.0.self_attn"]
    with caplog.at_level(logging.INFO, logger="hf_galore.targeting"):
        log_resolution(resolution, "test")
    records = [r for r in caplog.records if r.name == "hf_galore.targeting"]
    assert len(records) == 2  # one INFO line with the targets, one WARNING line with everything skipped
    assert "projecting 14 weight(s)" in records[0].getMessage()


def test_frozen_and_adapter_internals_are_not_targeted(tiny_llama):
    tiny_llama.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    resolution = resolve_target_modules(tiny_llama, "all-linear")
    assert "model.layers.0.self_attn.q_proj" not in resolution.names
    assert ("model.layers.0.self_attn.q_proj", "frozen (requires_grad=False)") in resolution.skipped


def test_peft_lora_model_targets_no_adapter_factors(tiny_llama):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(NoTargetModulesError, match=r"PEFT adapter internals|frozen"):
        resolve_target_modules(model, "all-linear")


def test_no_match_error_lists_existing_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(NoTargetModulesError) as err:
        resolve_target_modules(model, ["fc1"])
    assert "['fc1']" in str(err.value) and "0, 2" in str(err.value)
    with pytest.raises(NoTargetModulesError, match="got None"):
        resolve_target_modules(model, None)


def test_summarize_folds_layer_indices():
    assert summarize_names(sorted(LLAMA_LINEARS))[:40].startswith("model.layers.*.")
    assert "×2" in summarize_names(sorted(LLAMA_LINEARS))


def test_all_linear_excludes_nested_and_bart_style_heads():
    model = nn.Module()
    model.encoder = nn.Linear(8, 8)
    model.model = nn.Module()
    model.model.classifier = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    model.classification_head = nn.Module()
    model.classification_head.dense = nn.Linear(8, 8)
    assert resolve_target_modules(model, "all-linear").names == ["encoder"]


def test_summarize_folds_consecutive_indices():
    assert summarize_names(["blocks.0.1.conv", "blocks.1.0.conv"]) == "blocks.*.*.conv ×2"


def test_a_weight_shared_by_two_targeted_linears_is_listed_once():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    resolution = resolve_target_modules(model, "all-linear")
    assert resolution.names == ["0", "2"] and len(resolution.weights()) == 1
