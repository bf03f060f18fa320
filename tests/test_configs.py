from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_galore.configs import (
    AdafactorConfig,
    Blockwise8bitConfig,
    MultiTensorConfig,
    parse_optim_args,
    split_optim_args,
)
from hf_galore.errors import InvalidConfigError
from hf_galore.methods.flora import FloraAdafactor, FloraConfig
from hf_galore.methods.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreConfig
from hf_galore.registry import REGISTRY, get_spec


def test_defaults_match_transformers_builtin_galore():
    config = GaLoreConfig()
    assert (config.rank, config.update_proj_gap, config.scale, config.proj_type) == (128, 200, 0.25, "std")


def test_parse_converts_types_from_strings():
    galore, eightbit = parse_optim_args(
        "rank=8, update_proj_gap=50, scale=2, proj_type=reverse_std, svd=exact, stagger=true, block_size=128",
        [GaLoreConfig, Blockwise8bitConfig],
    )
    assert galore == GaLoreConfig(
        rank=8, update_proj_gap=50, scale=2.0, proj_type="reverse_std", svd="exact", stagger=True
    )
    assert eightbit.block_size == 128 and isinstance(galore.scale, float)


def test_optional_float_accepts_none():
    (_, adafactor) = parse_optim_args("beta1=none, clip_threshold=0.5", [GaLoreConfig, AdafactorConfig])
    assert adafactor.beta1 is None and adafactor.clip_threshold == 0.5
    (_, adafactor) = parse_optim_args("beta1=0.9", [GaLoreConfig, AdafactorConfig])
    assert adafactor.beta1 == 0.9


def test_unknown_key_lists_valid_keys_and_close_match():
    with pytest.raises(InvalidConfigError) as err:
        parse_optim_args("rnak=8", [GaLoreConfig], "galore_adamw")
    message = str(err.value)
    assert "'rnak'" in message and "did you mean 'rank'" in message
    assert "update_proj_gap" in message and "galore_adamw" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "optim_args, fragment",
    [
        ("rank=0", "rank must be a positive integer"),
        ("rank=abc", "expects a int"),
        ("proj_type=diagonal", "std, reverse_std, left, right, full"),
        ("svd=lanczos", "randomized, exact"),
        ("update_proj_gap=0", "update_proj_gap"),
        ("scale=-1", r"scale=-1.0 is not valid: it must be a finite number in \(0, ∞\)"),
        ("stagger=maybe", "expects a bool"),
        ("rank", "key=value"),
    ],
)
def test_bad_values_are_rejected_with_the_value(optim_args, fragment):
    with pytest.raises(InvalidConfigError, match=fragment):
        parse_optim_args(optim_args, [GaLoreConfig])


def test_to_dict_from_dict_round_trip():
    config = GaLoreConfig(rank=16, stagger=True)
    assert GaLoreConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InvalidConfigError, match="Unknown"):
        GaLoreConfig.from_dict({"rank": 4, "bogus": 1})


def test_split_accepts_dicts_and_empty():
    assert split_optim_args(None) == {}
    assert split_optim_args("") == {}
    assert split_optim_args({"rank": 4}) == {"rank": 4}
    assert split_optim_args("rank = 4 ,scale=1") == {"rank": "4", "scale": "1"}


# ------------------------------------------------------------------------------------- one home per knob (issue #17)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_optim_args_key_reaches_the_optimizer_through_its_declared_configs(name):
    """The spec's optimizer-kwargs configs are among those the optimizer class declares (WeLore's names expose no
    `foreach`), and the class' defaults are the configs' defaults (nothing written twice)."""
    spec = get_spec(name)
    cls = spec.optimizer_cls
    declared = {c for c in (cls.low_rank_config, *cls.inner_configs) if c is not None}
    assert {c for c in spec.config_classes if getattr(c, "optimizer_kwargs", True)} <= declared
    defaults = {**cls.low_rank_defaults(), **cls.inner_defaults}
    for config in declared:
        for f in dataclasses.fields(config):
            assert defaults[f.name] == f.default, (name, f.name)


@pytest.mark.parametrize(
    ("cls", "kwargs", "config"),
    [
        (GaLoreAdamW, {"foreach": "yes"}, MultiTensorConfig),
        (GaLoreAdafactor, {"warmup_init": True}, AdafactorConfig),
        (FloraAdafactor, {"kappa": 1.5}, FloraConfig),
        (FloraAdafactor, {"proj_type": "full"}, FloraConfig),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_optimizers_refuse_what_their_configs_refuse_with_the_same_message(cls, kwargs, config):
    weight = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(InvalidConfigError) as from_optimizer:
        cls([weight], lr=1e-3, **kwargs)
    with pytest.raises(InvalidConfigError) as from_config:
        config(**kwargs)
    assert str(from_optimizer.value) == str(from_config.value)
