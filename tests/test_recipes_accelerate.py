"""The accelerate launch configs in recipes/accelerate_configs/: each loads with accelerate's own config loader, its
keys are ones `accelerate launch` reads, the README lists it, and fsdp2.yaml is an FSDP2 config whose header names
the optim names that step on FSDP2's row shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser

from hf_galore.registry import row_sharding_names

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads_with_accelerate_and_is_listed(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert f"`{path.name}`" in (CONFIGS / "README.md").read_text()
    # `accelerate launch` copies fsdp_config.x onto its argument fsdp_x: an unknown key would be silently ignored.
    launch_options = {action.dest for action in launch_command_parser()._actions}
    unknown = [key for key in config.fsdp_config if key not in launch_options]
    assert not unknown, unknown


def test_fsdp2_config_is_fsdp2_and_names_the_supported_optimizers():
    path = CONFIGS / "fsdp2.yaml"
    config = load_config_from_file(str(path))
    assert str(config.distributed_type) in ("FSDP", "DistributedType.FSDP")
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert all(name in header for name in row_sharding_names()), row_sharding_names()
    assert "docs/how_to/fsdp2.md" in header
