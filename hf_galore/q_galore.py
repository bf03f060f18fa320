"""Q-GaLore model surgery, loading and merging (the optimizer itself is [`QGaLoreAdamW8bit`]).

* [`prepare_model`] replaces the targeted `nn.Linear` modules by [`Int8Linear`] in place. The registry runs it when
  the Trainer builds the optimizer: before the optimizer exists and before any DDP wrap.
* The replacement is recorded in `model.config.hf_galore_q_galore` (module names, bits, group size), so it travels
  in `config.json` with `save_pretrained`; the weights travel as the modules' buffers (`qweight` codes, fp32
  `weight_scales`/`weight_zeros`) in `model.safetensors`.
* [`from_pretrained`] rebuilds that structure and loads the buffers bit for bit. A plain
  `AutoModel.from_pretrained` of such a folder does *not* know the structure: it reports the INT8 keys as unexpected
  and the Linear weights as missing (newly initialised). Use this loader, or [`merge_to_dense`] before saving to get
  an ordinary checkpoint.
* [`merge_to_dense`] turns every [`Int8Linear`] back into an `nn.Linear` holding its dequantized weight.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .configs import QGaLoreConfig
from .errors import InvalidConfigError, NoTargetModulesError, UnsupportedSetupError
from .modules.int8_linear import Int8Linear
from .targeting import ALL_LINEAR, TargetSpec, _matches, log_resolution, resolve_target_modules

logger = logging.getLogger(__name__)

#: Attribute of `model.config` recording the INT8 structure.
CONFIG_KEY = "hf_galore_q_galore"
FORMAT_VERSION = 1


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _int8_targets(model: nn.Module, targets: TargetSpec | None) -> list[tuple[str, Int8Linear]]:
    """The [`Int8Linear`] modules of `model` that `targets` selects (with `all-linear`: all of them)."""
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Int8Linear) and (all_linear or (targets is not None and _matches(name, targets)))
    ]


def _q_config(configs: Sequence[Any]) -> QGaLoreConfig:
    return next((c for c in configs if isinstance(c, QGaLoreConfig)), QGaLoreConfig())


def _record(model: nn.Module, names: list[str], bits: int, group_size: int) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    record = getattr(config, CONFIG_KEY, None) or {"format_version": FORMAT_VERSION, "modules": {}}
    for name in names:
        record["modules"][name] = {"bits": bits, "group_size": group_size}
    setattr(config, CONFIG_KEY, record)


def quantize_model(
    model: nn.Module, target_modules: TargetSpec | None, weight_bits: int = 8, weight_group_size: int = 256
) -> list[str]:
    """Replace the targeted `nn.Linear` modules of `model` by [`Int8Linear`] in place (idempotent).

    Targets are resolved exactly as for GaLore (`"all-linear"` leaves heads out). Already converted modules are
    kept. Returns the names of the modules converted by this call.

    Raises:
        [`NoTargetModulesError`]: nothing matched and the model has no INT8 target either.
        [`InvalidConfigError`]: a targeted weight is shared with another module (tied), which INT8 cannot keep tied.
    """
    try:
        resolution = resolve_target_modules(model, target_modules)
    except NoTargetModulesError:
        if _int8_targets(model, target_modules):
            return []  # already prepared (e.g. a second Trainer on the same model)
        raise
    log_resolution(resolution, "Q-GaLore INT8 weights")
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    tied = [name for name, module in resolution.modules if counts.get(id(module.weight), 0) > 1]
    if tied:
        raise InvalidConfigError(
            f"Q-GaLore cannot quantize {tied}: their weights are tied to another module (e.g. embeddings). Leave "
            'them out of optim_target_modules ("all-linear" already excludes output heads).'
        )
    for name, linear in resolution.modules:
        _set_submodule(model, name, Int8Linear.from_linear(linear, weight_group_size, weight_bits))
    _record(model, resolution.names, weight_bits, weight_group_size)
    return resolution.names


def prepare_model(model: nn.Module, target_modules: TargetSpec | None, configs: Sequence[Any]) -> None:
    """Registry hook of the `q_galore_*` optimizers: [`quantize_model`] with the parsed [`QGaLoreConfig`]."""
    q = _q_config(configs)
    quantize_model(model, target_modules, q.weight_bits, q.weight_group_size)


def build_groups(
    model: nn.Module,
    target_modules: TargetSpec | None,
    weight_decay: float,
    no_decay_names: set[str] | None = None,
    description: str = "hf_galore",
    configs: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Param groups: the targeted INT8 weights' carriers (projected), then plain decay / no-decay parameters.

    Every trainable parameter is included (embeddings, norms, biases, heads): the carriers replace the Linear weights
    that the Trainer's default groups would otherwise have held.
    """
    int8 = _int8_targets(model, target_modules)
    if not int8:
        raise NoTargetModulesError(
            f"{description}: optim_target_modules={target_modules!r} selects no INT8 Linear after the model surgery. "
            'Pass e.g. optim_target_modules="all-linear" or a list of Linear module names.'
        )
    carriers = [m.grad_carrier for _, m in int8 if m.grad_carrier.requires_grad]
    logger.info("%s: %d INT8 weights projected (%s)", description, len(carriers), ", ".join(n for n, _ in int8))
    from .registry import group_parameters

    return group_parameters(model, carriers, weight_decay, (no_decay_names or set()).__contains__)


def _world_size(args: Any) -> int:
    try:
        return int(args.world_size)
    except Exception:  # noqa: BLE001 - the property may need a distributed state; treat as one process
        return 1


def check_setup(args: Any) -> None:
    """Reject `TrainingArguments` that Q-GaLore does not support yet (before anything is built)."""
    name = str(getattr(args.optim, "value", args.optim))
    problems = []
    if _world_size(args) > 1:
        problems.append(f"{_world_size(args)} processes (run on one process)")
    if problems:
        raise UnsupportedSetupError(
            f"optim={name!r} does not support yet: {'; '.join(problems)}. Q-GaLore's INT8 gradient carriers are "
            "not yet tested under DDP; train on one process (gradient accumulation works), or use "
            "galore_adamw_8bit for multi-GPU runs."
        )


# ---------------------------------------------------------------------------------------------------- load / merge
def merge_to_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every [`Int8Linear`] of `model` by an `nn.Linear` with its dequantized weight (in place; returns it).

    Args:
        model (`nn.Module`): A model prepared by Q-GaLore.
        dtype (`torch.dtype`, *optional*): dtype of the new weights (default: each module's gradient dtype).
    """
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]:
        _set_submodule(model, name, module.to_linear(dtype))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    return model


def _load_checkpoint_state(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(os.path.join(folder, file)))
        return state
    raise FileNotFoundError(f"No model.safetensors (or sharded index) in {folder!r}: save it with save_pretrained.")


def from_pretrained(path: str, model_class: type | None = None, **config_kwargs: Any) -> nn.Module:
    """Load a model saved with `save_pretrained` after Q-GaLore training, INT8 Linears and all, bit for bit.

    The architecture is built from `config.json` (randomly initialised), the Linears recorded in
    `config.hf_galore_q_galore` are replaced by empty [`Int8Linear`] modules, and the saved tensors are loaded
    strictly (tied weights excepted). The model is returned in eval mode.

    Args:
        path (`str`): A local folder written by `save_pretrained` / `Trainer.save_model`.
        model_class (`type`, *optional*): The model class, e.g. `LlamaForCausalLM` or an `AutoModelFor...` class;
            defaults to `config.architectures[0]`.
        **config_kwargs: Overrides passed to `AutoConfig.from_pretrained`.

    Raises:
        [`InvalidConfigError`]: the folder was not saved from a Q-GaLore model, or its weights do not fit.
    """
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    record = getattr(config, CONFIG_KEY, None)
    if not record or record.get("format_version") != FORMAT_VERSION:
        raise InvalidConfigError(
            f"{path!r} has no `{CONFIG_KEY}` record (format {FORMAT_VERSION}) in its config.json, so it was not "
            "saved from a Q-GaLore model. Load it with the usual `from_pretrained` instead."
        )
    if model_class is None:
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None:
            raise InvalidConfigError(
                f"config.architectures={architectures!r} names no transformers class; pass model_class=..., e.g. "
                "model_class=AutoModelForCausalLM."
            )
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        model = model_class._from_config(config)
    else:
        model = model_class.from_config(config)
    for name, spec in record["modules"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise InvalidConfigError(f"{name!r} is recorded as INT8 but is a {type(linear).__name__} in this model.")
        int8 = Int8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=spec["group_size"],
            bits=spec["bits"],
            dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        _set_submodule(model, name, int8)
    state = _load_checkpoint_state(path)
    result = model.load_state_dict(state, strict=False)
    loaded = model.state_dict(keep_vars=True)
    loaded_ptrs = {loaded[k].data_ptr() for k in state if k in loaded}
    missing = [k for k in result.missing_keys if loaded[k].data_ptr() not in loaded_ptrs]  # tied ones are fine
    if missing or result.unexpected_keys:
        raise InvalidConfigError(
            f"The weights in {path!r} do not fit the rebuilt model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. Was it saved from this architecture?"
        )
    return model.eval()
