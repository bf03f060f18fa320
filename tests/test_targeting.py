"""Target selection: transformers' `optim_target_modules` rules, PEFT models guarded."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import LLAMA_LINEARS, ROBERTA_ENCODER_LINEARS
from torch import nn

from hf_galore.errors import InvalidConfigError, NoTargetModulesError
from hf_galore.targeting import SkipKind, log_resolution, resolve_target_modules, summarize_names


def test_all_linear_excludes_the_classifier_head(tiny_roberta):
    assert set(resolve_target_modules(tiny_roberta, "all-linear").names) == ROBERTA_ENCODER_LINEARS
    with_heads = set(resolve_target_modules(tiny_roberta, "all_linear", include_heads=True).names)
    assert with_heads == ROBERTA_ENCODER_LINEARS | {"classifier.dense", "classifier.out_proj"}


def test_all_linear_excludes_lm_head(tiny_llama):
    assert set(resolve_target_modules(tiny_llama, "all-linear").names) == LLAMA_LINEARS
    # transformers' all-linear (galore_* names): every nn.Linear, lm_head included ...
    assert set(resolve_target_modules(tiny_llama, "all-linear", include_heads=True).names) == LLAMA_LINEARS | {
        "lm_head"
    }


def test_transformers_all_linear_leaves_out_a_head_tied_to_the_embedding():
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    # ... except a head tied to the input embedding: transformers never projects a tied weight.
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert set(resolve_target_modules(model, "all-linear", include_heads=True).names) == LLAMA_LINEARS


def test_string_is_a_fullmatch_regex(tiny_llama):
    names = resolve_target_modules(tiny_llama, r".*\.(q_proj|v_proj)").names
    assert set(names) == {n for n in LLAMA_LINEARS if n.endswith(("q_proj", "v_proj"))}
    # fullmatch, not search: "q_proj" alone matches nothing.
    with pytest.raises(NoTargetModulesError):
        resolve_target_modules(tiny_llama, "q_proj")


def test_list_entry_matches_exactly_as_substring_or_as_regex(tiny_roberta):
    # transformers' rule (check_target_module_exists): exact name, then substring, then re.fullmatch per entry.
    names = resolve_target_modules(tiny_roberta, ["query", "attention.output.dense"]).names
    assert set(names) == {n for n in ROBERTA_ENCODER_LINEARS if n.endswith(("query", "attention.output.dense"))}
    assert len(resolve_target_modules(tiny_roberta, ["output.dense"]).names) == 4
    # Substrings: "quer" selects every query (PEFT's suffix rule would have matched nothing).
    assert set(resolve_target_modules(tiny_roberta, ["quer"]).names) == {
        n for n in ROBERTA_ENCODER_LINEARS if n.endswith("query")
    }
    # Regex entries, as in transformers' tests and docs: [r".*attn.*", r".*mlp.*"].
    regex = resolve_target_modules(tiny_roberta, [r".*layer\.0\..*(key|value)", "layer.1.attention.self.key"]).names
    assert regex == [
        "roberta.encoder.layer.0.attention.self.key",
        "roberta.encoder.layer.0.attention.self.value",
        "roberta.encoder.layer.1.attention.self.key",
    ]
    # Tuples are accepted like lists (transformers raises a TypeError).
    assert (
        resolve_target_modules(tiny_roberta, ("quer",)).names == resolve_target_modules(tiny_roberta, ["quer"]).names
    )
    with pytest.raises(NoTargetModulesError):
        resolve_target_modules(tiny_roberta, ["nonexistent"])


@pytest.mark.parametrize("value", ["q_proj(", ["q_proj", "mlp["], (r"*attn",)])
def test_invalid_regex_is_our_clear_error(tiny_llama, value):
    with pytest.raises(InvalidConfigError, match="not a valid regular expression") as err:
        resolve_target_modules(tiny_llama, value)
    message = str(err.value)
    assert repr(value) in message and "Escape" in message  # the value, the regex error, the fix
    assert err.value.__cause__ is None and not isinstance(err.value, re.error)


@pytest.mark.parametrize("value", [5, {"q_proj"}, ["q_proj", 3]])
def test_targets_of_another_type_are_refused(tiny_llama, value):
    with pytest.raises(InvalidConfigError, match="not a string or a list of strings"):
        resolve_target_modules(tiny_llama, value)


def test_regex_matched_containers_are_ignored_quietly(tiny_llama, caplog):
    resolution = resolve_target_modules(tiny_llama, r"model\.layers\.\d+\.(self_attn|mlp)(\..*)?")
    assert set(resolution.names) == LLAMA_LINEARS
    assert resolution.skipped == [] and "model.layers.0.self_attn" in dict(resolution.ignored)
    with caplog.at_level(logging.INFO, logger="hf_galore.targeting"):
        log_resolution(resolution, "test")
    records = [r for r in caplog.records if r.name == "hf_galore.targeting"]
    assert len(records) == 1 and records[0].levelno == logging.INFO  # like transformers: no warning for regexes
    assert "projecting 14 weight(s)" in records[0].getMessage()


def test_non_linear_matched_by_name_is_skipped_and_reported_once(tiny_llama, caplog):
    resolution = resolve_target_modules(tiny_llama, ["self_attn", "mlp"])
    assert set(resolution.names) == LLAMA_LINEARS
    skipped = dict(resolution.skipped)
    assert "not an nn.Linear" in skipped["model.layers.0.self_attn"]
    assert "not an nn.Linear" in skipped["model.layers.1.mlp.act_fn"]
    # The reason is also structured, so code filters on its kind and module class instead of its wording.
    reason = skipped["model.layers.0.self_attn"]
    assert (
        reason.kind is SkipKind.NOT_LINEAR
        and reason.module_type == type(tiny_llama.model.layers[0].self_attn).__name__
    )
    with caplog.at_level(logging.INFO, logger="hf_galore.targeting"):
        log_resolution(resolution, "test")
    records = [r for r in caplog.records if r.name == "hf_galore.targeting"]
    assert len(records) == 2  # one INFO line with the targets, one WARNING line with everything skipped
    assert records[1].levelno == logging.WARNING and "model.layers.0.self_attn" in records[1].getMessage()


def test_frozen_and_adapter_internals_are_not_targeted(tiny_llama):
    tiny_llama.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    resolution = resolve_target_modules(tiny_llama, "all-linear")
    assert "model.layers.0.self_attn.q_proj" not in resolution.names
    assert ("model.layers.0.self_attn.q_proj", "frozen (requires_grad=False)") in resolution.skipped
    assert dict(resolution.skipped)["model.layers.0.self_attn.q_proj"].kind is SkipKind.FROZEN


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
