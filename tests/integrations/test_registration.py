"""Registration into transformers: enum members, handlers, unregister, and the errors users see."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch
from conftest import tiny_roberta_config
from trainer_utils import classification_dataset, make_trainer, training_args
from transformers import RobertaForSequenceClassification, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_galore
from hf_galore import REGISTRY
from hf_galore.errors import (
    InvalidConfigError,
    MissingDependencyError,
    NoTargetModulesError,
    UnsupportedSetupError,
    UnsupportedTransformersVersionError,
)
from hf_galore.integrations import transformers as integration
from hf_galore.utils import versions


def _snapshot():
    table = integration._handler_table()
    return {
        "member_names": list(OptimizerNames._member_names_),
        "member_map": dict(OptimizerNames._member_map_),
        "value_map": dict(OptimizerNames._value2member_map_),
        "attrs": {k: v for k, v in vars(OptimizerNames).items() if not k.startswith("__")},
        "table": dict(table) if table is not None else None,
        "create_optimizer": Trainer.__dict__["create_optimizer"],
        "init": Trainer.__dict__["__init__"],
        "get_cls": Trainer.__dict__["get_optimizer_cls_and_kwargs"],
        "load_optimizer": Trainer.__dict__["_load_optimizer_and_scheduler"],
    }


def test_unregister_restores_transformers_exactly_and_register_is_idempotent():
    assert hf_galore.is_registered()
    hf_galore.unregister()
    try:
        pristine = _snapshot()
        table = pristine["table"]
        if table is not None:  # transformers >= 5.2: built-in galore names keep their own (galore-torch) handlers
            assert table["galore_adamw"].__module__.startswith("transformers")
        hf_galore.register()
        hf_galore.register()  # idempotent
        registered = _snapshot()
        if table is not None:
            assert registered["table"]["galore_adamw"] is integration._handler
        else:  # older transformers: the dispatch method is wrapped instead
            assert registered["get_cls"] is not pristine["get_cls"]
        assert Trainer.__dict__["create_optimizer"] is not pristine["create_optimizer"]
        assert registered["load_optimizer"] is not pristine["load_optimizer"]
        hf_galore.unregister()
        hf_galore.unregister()  # idempotent too
        after = _snapshot()
        assert after["member_names"] == pristine["member_names"]
        assert after["member_map"] == pristine["member_map"]
        assert after["value_map"] == pristine["value_map"]
        assert after["attrs"].keys() == pristine["attrs"].keys()
        assert after["table"] == pristine["table"]
        assert all(after["table"][k] is pristine["table"][k] for k in pristine["table"] or {})
        assert after["create_optimizer"] is pristine["create_optimizer"]
        assert after["init"] is pristine["init"]
        assert after["get_cls"] is pristine["get_cls"]
        assert after["load_optimizer"] is pristine["load_optimizer"]
    finally:
        hf_galore.register()


def _setup_cfg_transformers_range() -> str:
    """The transformers requirement of setup.cfg's install_requires, the one place the range is written."""
    import configparser
    from pathlib import Path

    parser = configparser.ConfigParser()
    parser.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    (line,) = [r for r in parser["options"]["install_requires"].split() if r.startswith("transformers")]
    return line.removeprefix("transformers")


def test_supported_transformers_range_is_read_from_the_package_metadata():
    expected = _setup_cfg_transformers_range()
    assert versions.supported_transformers() == expected
    assert versions.transformers_install_hint() == f'pip install "transformers{expected}"'
    # Requires-Dist lines: lower bounds first whatever the metadata order; extras' requirements are not the range.
    requires = ["transformers[torch]<6,>=4.57", 'transformers>=9; extra == "test"', "torch>=2.4"]
    assert versions._requirement_specifier(requires, "transformers") == ">=4.57,<6"
    assert versions._requirement_specifier(requires[1:], "transformers") is None
    assert versions._requirement_specifier(["Transformers (<6,>=4.57)"], "transformers") == ">=4.57,<6"


def test_supported_transformers_without_installed_metadata(monkeypatch):
    def not_installed(name):
        raise versions.importlib.metadata.PackageNotFoundError(name)

    versions.supported_transformers.cache_clear()
    monkeypatch.setattr(versions.importlib.metadata, "requires", not_installed)
    try:
        assert versions.supported_transformers() is None
        assert versions.transformers_install_hint().startswith("pip install -e .")
    finally:
        versions.supported_transformers.cache_clear()


def test_unsupported_transformers_error_names_the_declared_range(monkeypatch):
    monkeypatch.setattr(integration._STATE, "active", False)
    monkeypatch.setattr(integration, "_handler_table", lambda: None)
    monkeypatch.delattr(Trainer, "get_optimizer_cls_and_kwargs")
    expected = _setup_cfg_transformers_range()
    with pytest.raises(UnsupportedTransformersVersionError) as err:
        integration.register()
    assert f"supports transformers {expected};" in str(err.value)
    assert f'pip install "transformers{expected}"' in str(err.value)


def test_all_registered_names_are_valid_training_arguments(tmp_path):
    for name in REGISTRY:
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, report_to=[])
        assert args.optim == name and OptimizerNames(name).value == name


def test_unknown_optim_name_lists_ours_and_a_close_match(tmp_path):
    with pytest.raises(ValueError) as err:
        TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw_8bti")
    message = str(err.value)
    assert "Did you mean 'galore_adamw_8bit'" in message
    for name in REGISTRY:
        assert name in message
    assert "adamw_torch" in message  # transformers' own choices are listed too


def _roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(tiny_roberta_config())


def test_unknown_optim_args_key_fails_before_training(tmp_path):
    model = _roberta()
    args = training_args(tmp_path, "galore_adamw", optim_args="rank=4, update_gap=10")
    trainer = make_trainer(model, args, classification_dataset())
    with pytest.raises(InvalidConfigError, match=r"'update_gap' \(did you mean 'update_proj_gap'\?\)"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_zero_target_matches_names_the_value_and_existing_modules(tmp_path):
    # LLaMA's module names on a RoBERTa model (["attn", "mlp"] would match RoBERTa's "attention" as a substring).
    args = training_args(tmp_path, "galore_adamw", optim_target_modules=["q_proj", "mlp"])
    trainer = make_trainer(_roberta(), args, classification_dataset())
    with pytest.raises(NoTargetModulesError) as err:
        trainer.train()
    assert "['q_proj', 'mlp']" in str(err.value) and "roberta.encoder.layer.0.attention.self.query" in str(err.value)


def test_missing_target_modules_is_a_clear_error(tmp_path):
    args = training_args(tmp_path, "galore_adamw", optim_target_modules=None)
    with pytest.raises(NoTargetModulesError, match="all-linear"):
        make_trainer(_roberta(), args, classification_dataset()).train()


def test_missing_bitsandbytes_names_the_pip_extra(tmp_path, monkeypatch):
    import importlib.util

    from hf_galore.utils import imports

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    imports.is_bitsandbytes_available.cache_clear()
    try:
        args = training_args(tmp_path, "galore_adamw_8bit")
        with pytest.raises(MissingDependencyError, match=r"pip install bitsandbytes  \(from a clone"):
            make_trainer(_roberta(), args, classification_dataset()).train()
    finally:
        imports.is_bitsandbytes_available.cache_clear()


def test_layerwise_unsupported_setups_fail_before_the_first_step(tmp_path, monkeypatch):
    model = _roberta()
    before = [p.detach().clone() for p in model.parameters()]
    args = training_args(tmp_path, "galore_adamw_layerwise")
    monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 2))  # as if two GPUs ran under DataParallel
    trainer = make_trainer(model, args, classification_dataset())
    with pytest.raises(UnsupportedSetupError) as err:
        trainer.train()
    assert "DataParallel" in str(err.value) and "optim='galore_adamw'" in str(err.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_layerwise_fp16_is_rejected():
    class Args:
        fp16 = True
        n_gpu = 0
        world_size = 1

    with pytest.raises(UnsupportedSetupError, match="bf16"):
        integration.check_supported_setup(Args(), "galore_adamw_8bit_layerwise")
    Args.fp16, Args.mixed_precision = False, "fp16"  # fp16 set only by the accelerate launch config
    with pytest.raises(UnsupportedSetupError, match="bf16"):
        integration.check_supported_setup(Args(), "galore_adamw_layerwise")


def test_deepspeed_and_fsdp_are_rejected_with_the_alternative():
    class Args:
        deepspeed = "ds_config.json"
        fsdp = None

    with pytest.raises(UnsupportedSetupError, match="DDP"):
        integration.check_supported_setup(Args(), "galore_adamw")
    Args.deepspeed, Args.fsdp = None, "full_shard"
    with pytest.raises(UnsupportedSetupError, match="FSDP"):
        integration.check_supported_setup(Args(), "galore_adamw")


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerate_launch_configs_for_fsdp_or_deepspeed_fail_before_training(tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, "true")

    class Args:
        deepspeed = None
        fsdp = None

    with pytest.raises(UnsupportedSetupError, match="accelerate launch --num_processes N"):
        integration.check_supported_setup(Args(), "galore_adamw_8bit_layerwise")


def test_deepspeed_and_fsdp1_refusals_point_to_fsdp2_and_its_optim_names(monkeypatch):
    class Args:
        deepspeed = None
        fsdp = "full_shard"
        fsdp_config = MappingProxyType({"version": 1})  # TrainingArguments strips the fsdp_ prefix

    fsdp2 = r"fsdp_version': 2.*recipes/accelerate_configs/fsdp2\.yaml.*galore_adamw, galore_adamw_8bit.*flora_adamw"
    with pytest.raises(UnsupportedSetupError, match=rf"cannot run under FSDP1.*{fsdp2}"):
        integration.check_supported_setup(Args(), "galore_adamw")
    Args.deepspeed, Args.fsdp = "ds_config.json", None
    with pytest.raises(UnsupportedSetupError, match=rf"DeepSpeed.*{fsdp2}"):
        integration.check_supported_setup(Args(), "galore_adamw_layerwise")
    # An accelerate launch config: FSDP_VERSION says which (accelerate's default is 1).
    Args.deepspeed, Args.fsdp_config = None, None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UnsupportedSetupError, match="FSDP1"):
        integration.check_supported_setup(Args(), "galore_adamw")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UnsupportedSetupError, match="FSDP1"):
        integration.check_supported_setup(Args(), "flora_adamw")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert integration.fsdp_version(Args()) == 2


def test_weight_decay_split_and_adam_hyperparameters_reach_the_optimizer(tmp_path):
    model = _roberta()
    args = training_args(
        tmp_path, "galore_adamw", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, weight_decay=0.1
    )
    cls, kwargs = hf_galore.optimizer_cls_and_kwargs(args, model)
    assert cls is hf_galore.GaLoreAdamW and kwargs["betas"] == (0.8, 0.95) and kwargs["eps"] == 1e-7
    groups = kwargs["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    low_rank, decay, no_decay = groups
    assert low_rank["low_rank"] and low_rank["weight_decay"] == 0.1
    assert all(names[id(p)].endswith("weight") for p in low_rank["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    # galore_* names follow transformers' all-linear: the classifier head is projected, embeddings are decayed.
    assert "classifier.out_proj.weight" in {names[id(p)] for p in low_rank["params"]}
    assert "roberta.embeddings.word_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    counted = sum(len(g["params"]) for g in groups)
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)


def test_frozen_parameters_are_left_out(tmp_path):
    model = _roberta()
    for p in model.roberta.embeddings.parameters():
        p.requires_grad_(False)
    model.roberta.encoder.layer[0].attention.self.query.weight.requires_grad_(False)
    _, kwargs = hf_galore.optimizer_cls_and_kwargs(training_args(tmp_path, "galore_adamw"), model)
    grouped = {id(p) for g in kwargs["params"] for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(kwargs["params"][0]["params"]) == 13  # 12 encoder Linears + 2 classifier Linears - the frozen query


def test_optim_name_reads_members_and_strings():
    from hf_galore.registry import optim_name

    assert optim_name(OptimizerNames.GALORE_ADAMW) == "galore_adamw" == optim_name("galore_adamw")
    assert optim_name(OptimizerNames("flora_adamw")) == "flora_adamw"


def test_no_module_below_the_methods_imports_a_method():
    """optim/, projection/, modules/, utils/ and the leaf modules never import `hf_galore.methods` (the deprecation
    aliases name moved attributes as strings and import them only when a deprecated name is used)."""
    import ast
    from pathlib import Path

    root = Path(hf_galore.__file__).parent
    lower = [*(root / d for d in ("optim", "projection", "modules", "utils"))]
    files = [f for d in lower for f in d.rglob("*.py")]
    files += [root / f"{m}.py" for m in ("configs", "registry", "targeting", "builder", "errors")]
    offenders = []
    for path in files:
        package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module or ""]) if node.level else node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == "hf_galore.methods" or n.startswith("hf_galore.methods.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
