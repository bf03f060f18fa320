"""Q-GaLore's model transform: INT8 surgery, loading and merging (the optimizer is [`QGaLoreAdamW8bit`]).

* [`quantize_model`] replaces the targeted `nn.Linear` modules by [`Int8Linear`] in place. The Trainer integration
  runs it at the end of `Trainer.__init__`, after every check that can refuse the run, before the optimizer exists
  and before any DDP wrap.
* The replacement is recorded in `model.config.quantization_config` (`quant_method="hf_galore_q_galore"`: module
  names, bits, group size), so it travels in `config.json` with `save_pretrained`; the weights travel as the
  modules' buffers (`qweight` codes, fp32 `weight_scales`/`weight_zeros`) in `model.safetensors`.
* After `import hf_galore`, the stock `AutoModel*.from_pretrained` rebuilds that structure and loads the buffers
  bit for bit (see `hf_galore.loading`); without the import it raises instead of loading random Linears.
  [`from_pretrained`] is a thin wrapper that also picks the class from `config.architectures`.
* [`merge`] (or `model.dequantize()`; formerly `merge_to_dense`) turns every [`Int8Linear`] back into an `nn.Linear` holding its
  dequantized weight: an ordinary checkpoint that plain transformers loads.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn

from ... import loading
from ...errors import InvalidConfigError, NoTargetModulesError
from ...loading import FORMAT_VERSION, set_submodule
from ...modules.int8_linear import FIXED_DTYPE_BUFFERS, Int8Linear
from ...targeting import ALL_LINEAR, TargetSpec, log_resolution, matches_target, resolve_target_modules

logger = logging.getLogger(__name__)

#: `quantization_config.quant_method` of a model whose target Linears are INT8.
QUANT_METHOD = "hf_galore_q_galore"
#: `config.json` key of the record before it moved into `quantization_config` (still read by the loader).
LEGACY_CONFIG_KEY = "hf_galore_q_galore"


def int8_targets(model: nn.Module, targets: TargetSpec | None) -> list[tuple[str, Int8Linear]]:
    """The [`Int8Linear`] modules of `model` that `targets` selects (with `all-linear`: all of them)."""
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Int8Linear) and (all_linear or (targets is not None and matches_target(name, targets)))
    ]


def _record(model: nn.Module, names: list[str], bits: int, group_size: int) -> None:
    record = loading.get_record(model, QUANT_METHOD) or {"format_version": FORMAT_VERSION, "modules": {}}
    for name in names:
        record["modules"][name] = {"bits": bits, "group_size": group_size}
    loading.set_record(model, QUANT_METHOD, record)


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
        if int8_targets(model, target_modules):
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
    loading.check_can_record(model, QUANT_METHOD)
    for name, linear in resolution.modules:
        set_submodule(model, name, Int8Linear.from_linear(linear, weight_group_size, weight_bits))
    _record(model, resolution.names, weight_bits, weight_group_size)
    return resolution.names


# ---------------------------------------------------------------------------------------------------- load / merge
def merge(model: nn.Module, dtype: torch.dtype | None = None, *, inplace: bool = True) -> nn.Module:
    """Replace every [`Int8Linear`] of `model` by an `nn.Linear` with its dequantized weight.

    The record (`quantization_config`) is removed too, so `save_pretrained` then writes an ordinary checkpoint. Same
    name and arguments as `hf_galore.welore.merge`.

    Args:
        model (`nn.Module`): A model prepared by Q-GaLore.
        dtype (`torch.dtype`, *optional*): dtype of the new weights (default: each module's gradient dtype).
        inplace (`bool`, defaults to `True`): Modify `model` itself; `False` merges a deep copy.

    Returns:
        `nn.Module`: The dense model.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]:
        set_submodule(model, name, module.to_linear(dtype))
    loading.set_record(model, QUANT_METHOD, None)
    return model


def merge_to_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Deprecated name of [`merge`] (in place), kept for existing code; warns with a `FutureWarning`."""
    warnings.warn(
        "hf_galore.q_galore.merge_to_dense is renamed hf_galore.q_galore.merge (the name WeLore uses); the old name "
        "will be removed in a future release.",
        FutureWarning,
        stacklevel=2,
    )
    return merge(model, dtype)


def _build(model: nn.Module, record: dict[str, Any]) -> None:
    """Empty [`Int8Linear`]s where `record` says, on the Linears' device (meta while transformers loads) and dtype."""
    for name, spec in record["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise InvalidConfigError(
                f"The Q-GaLore record names module {name!r}, which {type(model).__name__} does not have: load the "
                "checkpoint with the class it was saved from (config.architectures)."
            ) from None
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
        set_submodule(model, name, int8)


def _finish(model: nn.Module, record: dict[str, Any]) -> None:
    """After loading: the carriers (never in a checkpoint) follow their module's codes off the meta device, and fp32
    scales/zeros that the loader cast to the model's dtype are read again as stored.

    transformers 4.x casts every floating tensor of a quantized model to the load dtype (`torch_dtype=bfloat16`
    would round the scales, changing every dequantized weight); 5.x keeps them. The folder is the one just loaded.
    """
    cast = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            if module.grad_carrier.device != module.qweight.device:
                module.carrier_to_codes_device_()
            cast += [f"{name}.{key}" for key in FIXED_DTYPE_BUFFERS if getattr(module, key).dtype != torch.float32]
    if cast:
        path = getattr(getattr(model, "config", None), "name_or_path", None)
        if not path or not os.path.isdir(path):
            raise InvalidConfigError(
                f"The loader cast the fp32 INT8 scales/zeros (e.g. {cast[0]!r}) to another dtype. Load with "
                "dtype=torch.float32, or use transformers>=5, which keeps them."
            )
        for key, tensor in loading.read_checkpoint_tensors(path, cast).items():
            module_name, _, buffer = key.rpartition(".")
            getattr(model.get_submodule(module_name), buffer).data = tensor.to(torch.float32)


loading.register_format(
    loading.ModelFormat(
        quant_method=QUANT_METHOD,
        name="Q-GaLore",
        module_names=lambda record: list(record["modules"]),
        build=_build,
        finish=_finish,
        merge=merge,
        legacy_config_key=LEGACY_CONFIG_KEY,
    )
)


def from_pretrained(
    path: str | os.PathLike,
    model_class: type | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a model saved after Q-GaLore training, INT8 Linears and all, bit for bit (in eval mode).

    A thin wrapper of the stock `from_pretrained` (which loads these checkpoints itself after `import hf_galore`):
    it checks the checkpoint is a Q-GaLore one, with a clear error otherwise, and defaults the class to
    `config.architectures[0]`. Same arguments, in the same order, as `hf_galore.welore.from_pretrained`.

    Args:
        path (`str`): A local folder written by `save_pretrained` / `Trainer.save_model`.
        model_class (`type`, *optional*): The model class, e.g. `LlamaForCausalLM` or an `AutoModelFor...` class.
        dtype (`torch.dtype` or `str`, *optional*): dtype of the float weights (transformers' default when unset);
            the INT8 codes and their fp32 scales/zeros keep their stored dtypes.
        device (`torch.device` or `str`, *optional*): Device to move the model to after loading.
        **kwargs: Passed to `from_pretrained` (e.g. `device_map`).

    Raises:
        [`InvalidConfigError`]: the folder was not saved from a Q-GaLore model.
    """
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = loading.from_pretrained(path, QUANT_METHOD, model_class, **kwargs)
    return model.to(device) if device is not None else model
