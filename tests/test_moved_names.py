"""Names that moved in the one-folder-per-method restructuring keep working: old module paths and attributes resolve
to the new objects (with a FutureWarning where the old name is deprecated), and old checkpoints still load."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

import hf_galore
from hf_galore.methods import flora, galore, q_galore, welore

DEPRECATED_MODULES = {
    "hf_galore.optim.galore": "hf_galore.methods.galore.optimizer",
    "hf_galore.optim.flora": "hf_galore.methods.flora.optimizer",
    "hf_galore.optim.q_galore": "hf_galore.methods.q_galore.optimizer",
}
DEPRECATED_ATTRIBUTES = [
    ("hf_galore.optim", "GaLoreAdamW", galore.GaLoreAdamW),
    ("hf_galore.optim", "GaLoreAdafactorLayerwise", galore.GaLoreAdafactorLayerwise),
    ("hf_galore.configs", "GaLoreConfig", galore.GaLoreConfig),
    ("hf_galore.configs", "QGaLoreConfig", q_galore.QGaLoreConfig),
    ("hf_galore.configs", "FloraConfig", flora.FloraConfig),
    ("hf_galore.configs", "FloraAccumulationConfig", flora.FloraAccumulationConfig),
    ("hf_galore.configs", "WeLoreConfig", welore.WeLoreConfig),
    ("hf_galore.registry", "build_param_groups", hf_galore.targeting.build_param_groups),
    ("hf_galore.registry", "group_parameters", hf_galore.targeting.group_parameters),
    ("hf_galore.registry", "make_optimizer_kwargs", hf_galore.builder.make_optimizer_kwargs),
    ("hf_galore.registry", "optimizer_settings", hf_galore.builder.optimizer_settings),
    ("hf_galore.optim.layerwise", "GaLoreAdamW8bitLayerwise", galore.GaLoreAdamW8bitLayerwise),
    ("hf_galore.configs", "PROJ_TYPES", galore.config.PROJ_TYPES),
    ("hf_galore.configs", "FLORA_ACCUMULATION", flora.config.FLORA_ACCUMULATION),
    ("hf_galore.q_galore", "check_setup", q_galore.spec.check_setup),
    ("hf_galore.q_galore", "LEGACY_CONFIG_KEY", q_galore.transform.LEGACY_CONFIG_KEY),
    ("hf_galore.welore", "registry_prepare_model", welore.spec.prepare_model),
    ("hf_galore.welore", "registry_build_groups", welore.spec.build_groups),
    ("hf_galore.welore", "FORMAT_VERSION", welore.transform.FORMAT_VERSION),
    ("hf_galore.optim.q_galore", "Q_GALORE_DEFAULTS", q_galore.config.Q_GALORE_DEFAULTS),
]


@pytest.mark.parametrize(("old", "new"), sorted(DEPRECATED_MODULES.items()))
def test_old_module_paths_import_the_new_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=rf"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the alias does not rewrite the real module's spec


@pytest.mark.parametrize(("module", "name", "expected"), DEPRECATED_ATTRIBUTES)
def test_old_attributes_resolve_with_a_warning(module, name, expected):
    with pytest.warns(FutureWarning, match=rf"\.{name} moved to"):
        assert getattr(importlib.import_module(module), name) is expected


def test_low_rank_defaults_alias_is_galore_config_plus_low_rank():
    with pytest.warns(FutureWarning, match="LOW_RANK_DEFAULTS moved"):
        from hf_galore.optim.base import LOW_RANK_DEFAULTS
    fields = {f.name: f.default for f in dataclasses.fields(galore.GaLoreConfig)}
    assert {"low_rank": False, **fields} == LOW_RANK_DEFAULTS


def test_supported_transformers_alias_reads_the_one_declared_range():
    from hf_galore.integrations import transformers as integration
    from hf_galore.utils.versions import supported_transformers

    with pytest.warns(FutureWarning, match="SUPPORTED_TRANSFORMERS moved"):
        assert supported_transformers() == integration.SUPPORTED_TRANSFORMERS


def test_unknown_attributes_still_raise():
    with pytest.raises(AttributeError, match="no attribute 'NotAName'"):
        hf_galore.optim.NotAName  # noqa: B018


def test_public_short_names_are_the_method_packages_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_galore.welore is welore and hf_galore.q_galore is q_galore
        from hf_galore.q_galore import merge_to_dense, quantize_model
        from hf_galore.welore import compress

    assert compress is welore.compress and quantize_model is q_galore.quantize_model
    assert callable(merge_to_dense)
    assert hf_galore.GaLoreAdamW is galore.GaLoreAdamW and hf_galore.WeLoreAdamW is welore.WeLoreAdamW


def test_a_welore_state_written_as_galore_adamw_resumes_into_welore_adamw():
    """Before WeLore had optimizer classes of its own, `welore_adamw` ran GaLoreAdamW (no projected group): the
    same state layout, so its checkpoints load, and the continued run equals one that never left GaLoreAdamW."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    batches = [torch.randn(3, 6) for _ in range(4)]

    def step(optimizer, x):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    old = galore.GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x in batches[:2]:
        step(old, x)
    saved = copy.deepcopy(old.state_dict())  # state_dict() references the live moment tensors
    assert saved["hf_galore"]["kind"] == "GaLoreAdamW"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for x in batches[2:]:
        step(old, x)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(weights)
    new = welore.WeLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    new.load_state_dict(saved)
    for x in batches[2:]:
        step(new, x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key
    assert new.state_dict()["hf_galore"]["kind"] == "WeLoreAdamW"
    assert "rank" not in new.param_groups[0]  # GaLore's knobs are not carried into WeLore's groups


def test_welore_optimizers_refuse_a_projected_group():
    with pytest.raises(hf_galore.InvalidConfigError, match="WeLoreAdamW projects no parameter"):
        welore.WeLoreAdamW([{"params": [nn.Parameter(torch.zeros(4, 4))], "low_rank": True}])


def test_a_spec_with_one_argument_hooks_still_registers_and_runs(monkeypatch):
    """Specs written before the hooks took the plan's configs (`check_setup(args)`, `hooked_cls(args)`) keep working."""
    from types import SimpleNamespace

    from hf_galore.integrations.transformers import check_supported_setup
    from hf_galore.registry import REGISTRY, OptimizerSpec, register_optimizer

    seen = []
    spec = register_optimizer(
        OptimizerSpec(
            name="one_argument_hooks_adamw",
            method="Test",
            optimizer_cls=galore.GaLoreAdamW,
            config_classes=(galore.GaLoreConfig,),
            check_setup=lambda args: seen.append(("check", args.optim)),
            hooked_cls=lambda args: seen.append(("hooked", args.optim)),
        )
    )
    try:
        assert spec.check_setup(SimpleNamespace(optim="x"), ()) is None
        assert spec.hooked_cls(SimpleNamespace(optim="y"), ()) is None
        assert seen == [("check", "x"), ("hooked", "y")]
        args = SimpleNamespace(optim="one_argument_hooks_adamw", optim_args=None, gradient_accumulation_steps=1,
                               world_size=1, deepspeed=None, fsdp=None, fp16=False)  # fmt: skip
        check_supported_setup(args, "one_argument_hooks_adamw", ())
        assert ("check", "one_argument_hooks_adamw") in seen
    finally:
        REGISTRY.pop("one_argument_hooks_adamw")
