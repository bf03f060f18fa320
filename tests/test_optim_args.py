"""The `optim_args` path before training: malformed strings get our error, pickled TrainingArguments load."""

from __future__ import annotations

import pickle

import pytest
from conftest import tiny_roberta_config
from trainer_utils import classification_dataset, make_trainer, training_args
from transformers import RobertaForSequenceClassification, TrainingArguments

import hf_galore
from hf_galore.configs import split_optim_args
from hf_galore.errors import InvalidConfigError


@pytest.mark.parametrize(
    "optim_args, fragment",
    [
        ("rank=4,", "an empty item (a trailing or doubled comma)"),
        ("rank=4,,scale=1", "an empty item (a trailing or doubled comma)"),
        ("rank", "the item 'rank'"),
        ("rank=4=5", "the item 'rank=4=5'"),
        ("=4", "the item '=4'"),
        (" ", "an empty item"),
    ],
)
@pytest.mark.parametrize("optim", ["galore_adamw", "flora_adamw"])  # a name transformers knows, and one it does not
def test_malformed_optim_args_get_our_error_before_transformers_parser(tmp_path, optim, optim_args, fragment):
    args = training_args(tmp_path, optim, optim_args=optim_args)
    trainer = make_trainer(RobertaForSequenceClassification(tiny_roberta_config()), args, classification_dataset(n=8))
    # transformers' own parser would raise "not enough values to unpack" / "too many values to unpack" here.
    with pytest.raises(InvalidConfigError, match="optim_args=") as info:
        trainer.create_optimizer()
    assert fragment in str(info.value) and repr(optim_args) in str(info.value)
    assert 'e.g. optim_args="rank=8, update_proj_gap=200"' in str(info.value)


def test_split_accepts_what_transformers_accepts():
    assert split_optim_args("rank = 4, update_proj_gap=200") == {"rank": "4", "update_proj_gap": "200"}
    assert split_optim_args("") == {} and split_optim_args(None) == {}


def test_pickled_training_arguments_with_our_name_load_without_import_hf_galore(tmp_path):
    args = TrainingArguments(str(tmp_path), optim="flora_adamw", report_to=[])
    data = pickle.dumps(args)  # what the Trainer's training_args.bin holds (torch.save pickles it)
    assert b"optimizer_name_from_pickle" in data  # our member loads through hf_galore, not OptimizerNames(value)
    hf_galore.unregister()  # a fresh process: transformers does not know flora_adamw
    try:
        with pytest.raises(ValueError, match="flora_adamw"):
            TrainingArguments(str(tmp_path), optim="flora_adamw", report_to=[])
        loaded = pickle.loads(data)  # imports and registers hf_galore
        assert hf_galore.is_registered()
        assert loaded.optim == "flora_adamw"
    finally:
        hf_galore.register()
