"""One place for building and loading models: meta-device models from a config, dense models from a folder,
checkpoint tensors (safetensors or `pytorch_model.bin`), module swaps, and hf_galore's own formats (Q-GaLore's INT8
Linears, WeLore's factors). Every other module (the CLI, the memory estimator, the methods' transforms) goes through
the helpers here instead of calling transformers' model classes itself.

A method whose model surgery changes the module structure registers a [`ModelFormat`] here: how to rebuild the
empty structure from its record, what to finish after the weights are loaded, and how to merge back to dense
Linears. This module then makes the stock `AutoModel*.from_pretrained` load those checkpoints bit for bit:

* **The record** (which modules were converted, and how) lives in `model.config.quantization_config`, whose
  `quant_method` names the format. `save_pretrained` writes it into `config.json`.
* **transformers' quantizer registry** (`register_quantization_config` / `register_quantizer`, feature-detected)
  maps each `quant_method` to an `HfQuantizer` that builds the recorded structure on the meta-device model before
  the weights load and finishes it afterwards. So after `import hf_galore`, the stock call rebuilds the model.
* **A format guard** makes the same call fail without `import hf_galore`. transformers only *warns* about an
  unknown `quant_method` and then loads the checkpoint into the dense architecture, initialising the converted
  Linears at random. So every saved checkpoint also holds, for each converted module, an empty tensor under the
  dense weight's name (`<module>.weight`, shape `(0,)`): a loader that does not know the format hits a size
  mismatch on it and raises, while our quantizer declares those keys expected-unused. The guards are added by the
  quantizer's `get_state_dict_and_metadata` at save time, never to the model's own `state_dict()`.

After the surgery the model carries the same quantizer (`model.hf_quantizer`), exactly as a loaded one does, so
`save_pretrained` / `Trainer.save_model` / Trainer checkpoints write the record and the guards, and
`model.dequantize()` merges back to dense Linears.

transformers is imported lazily: importing this module (or a method's module) does not import it.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidConfigError
from .utils.versions import transformers_install_hint

logger = logging.getLogger(__name__)

#: Version of the records' layout, bumped on incompatible changes.
FORMAT_VERSION = 1
#: Name of the (empty) guard tensor written for each converted module: the dense Linear's weight key.
GUARD_KEY = "weight"
#: Attribute holding the records of a model without a `config` (a plain `nn.Module`).
_PLAIN_RECORDS = "_hf_galore_records"


@dataclass(frozen=True)
class ModelFormat:
    """How one method's converted model is rebuilt, finished and merged.

    Attributes:
        quant_method: The `quantization_config.quant_method` naming the format (e.g. `"hf_galore_q_galore"`).
        name: The method, for messages (e.g. `"Q-GaLore"`).
        module_names: The converted modules' names listed in a record.
        build: `build(model, record)` replaces the recorded modules by empty converted ones, in place (the model may
            be on the meta device: its weights are loaded afterwards).
        finish: `finish(model, record)` after the weights are loaded (e.g. trainable flags, device fix-ups).
        merge: `merge(model)` turns the converted modules back into dense `nn.Linear`s and drops the record.
        legacy_config_key: The `config.json` key older versions wrote the record under, still read by
            [`from_pretrained`].
    """

    quant_method: str
    name: str
    module_names: Callable[[dict[str, Any]], list[str]]
    build: Callable[[nn.Module, dict[str, Any]], None]
    finish: Callable[[nn.Module, dict[str, Any]], None]
    merge: Callable[[nn.Module], nn.Module]
    legacy_config_key: str | None = None


FORMATS: dict[str, ModelFormat] = {}


def register_format(model_format: ModelFormat) -> ModelFormat:
    """Add `model_format`; registered with transformers' quantizer registry too when that is already set up."""
    FORMATS[model_format.quant_method] = model_format
    if _REGISTERED_WITH_TRANSFORMERS:
        _register_one(model_format)
    return model_format


# ------------------------------------------------------------------------------------------------------------------
# Records on the model
# ------------------------------------------------------------------------------------------------------------------


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` of `model` by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _quant_method(quantization_config: Any) -> str | None:
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method")
    method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)


def get_record(model: nn.Module, quant_method: str) -> dict[str, Any] | None:
    """A copy of the record of format `quant_method` on `model`, or None (change it with [`set_record`])."""
    config = getattr(model, "config", None)
    if config is None:
        record = getattr(model, _PLAIN_RECORDS, {}).get(quant_method)
        return copy.deepcopy(record) if record is not None else None
    quantization_config = getattr(config, "quantization_config", None)
    if _quant_method(quantization_config) != quant_method:
        return None
    values = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    return {k: copy.deepcopy(v) for k, v in values.items() if k != "quant_method"}


def check_can_record(model: nn.Module, quant_method: str) -> None:
    """Raise [`InvalidConfigError`] when `model` is quantized by another method (one record per model).

    Run it before the surgery: it changes nothing.
    """
    config = getattr(model, "config", None)
    other = _quant_method(getattr(config, "quantization_config", None)) if config is not None else None
    if other is not None and other != quant_method:
        name = FORMATS[quant_method].name if quant_method in FORMATS else quant_method
        raise InvalidConfigError(
            f"The model is already quantized with quant_method={other!r}; {name} cannot convert it as well (a model "
            "holds one quantization format). Start from the dense model, or dequantize/merge it first."
        )


def set_record(model: nn.Module, quant_method: str, record: dict[str, Any] | None) -> None:
    """Store `record` as the model's quantization config of format `quant_method` (None removes it).

    On a transformers model this also attaches the format's quantizer as `model.hf_quantizer`, as
    `from_pretrained` does for a loaded model, so that saving writes the format guards.
    """
    config = getattr(model, "config", None)
    if config is None:
        records = getattr(model, _PLAIN_RECORDS, None) or {}
        if record is None:
            records.pop(quant_method, None)
        else:
            records[quant_method] = copy.deepcopy(record)
        if records:
            setattr(model, _PLAIN_RECORDS, records)
        else:
            model.__dict__.pop(_PLAIN_RECORDS, None)
        return
    if record is None:
        if _quant_method(getattr(config, "quantization_config", None)) == quant_method:
            del config.quantization_config
            for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
                model.__dict__.pop(attr, None)
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
            # transformers 4.x sets it on load and serialises the config without it only while quantized.
            config.__dict__.pop("_pre_quantization_dtype", None)
        return
    check_can_record(model, quant_method)
    classes = _transformers_classes()
    if classes is None:  # transformers without the quantizer API: the record still travels in config.json
        config.quantization_config = {"quant_method": quant_method, **copy.deepcopy(record)}
        return
    config_cls, quantizer_cls = classes[quant_method]
    config.quantization_config = config_cls(**copy.deepcopy(record))
    model.hf_quantizer = quantizer_cls(config.quantization_config, pre_quantized=True)


#: Checkpoint files of a model folder, in the order `from_pretrained` prefers them: `(index, single file)`.
_CHECKPOINT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def read_checkpoint_tensors(path: str | os.PathLike, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of the checkpoint in the folder `path`, as stored.

    Reads safetensors (`model.safetensors` or its sharded index) and, failing that, PyTorch pickles
    (`pytorch_model.bin` or its index, with `torch.load(weights_only=True)`): the formats `save_pretrained` writes.

    Raises:
        [`InvalidConfigError`]: a key is not in the checkpoint, or the folder holds no checkpoint.
    """
    import json

    path = os.fspath(path)
    for index_name, single_name in _CHECKPOINT_FILES:
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            break
        if os.path.isfile(os.path.join(path, single_name)):
            weight_map = dict.fromkeys(keys, single_name)
            break
    else:
        raise InvalidConfigError(
            f"{path!r} holds no checkpoint (model.safetensors, pytorch_model.bin, or their sharded index)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({weight_map.get(k, "") for k in keys}):
        wanted = [k for k in keys if weight_map.get(k, "") == file]
        available = _read_file(os.path.join(path, file), wanted)
        missing = [k for k in wanted if k not in available]
        if missing:
            raise InvalidConfigError(f"{path!r} has no tensor {missing[0]!r}.")
        tensors.update(available)
    return tensors


def _read_file(file: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` present in one checkpoint file (safetensors: only those are read)."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as handle:
            present = set(handle.keys())
            return {k: handle.get_tensor(k) for k in keys if k in present}
    state_dict = torch.load(file, map_location="cpu", weights_only=True)
    return {k: state_dict[k] for k in keys if k in state_dict}


# ------------------------------------------------------------------------------------------------------------------
# Building models
# ------------------------------------------------------------------------------------------------------------------


def config_path(path: str | os.PathLike) -> Path:
    """The `config.json` named by `path` (a directory holding one, or the file itself).

    Raises:
        `FileNotFoundError`: `path` is neither.
    """
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "config.json"
        if not candidate.is_file():
            raise FileNotFoundError(f"{os.fspath(path)!r} is a directory without a config.json.")
    elif not candidate.is_file():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} is neither a directory containing config.json nor a config.json file."
        )
    return candidate


def load_config(path: str | os.PathLike) -> Any:
    """The `PretrainedConfig` of a local `config.json` or of the folder holding one."""
    import transformers

    file = config_path(path)
    # A directory is passed as itself (transformers then also finds sibling files); any other file name as the file.
    return transformers.AutoConfig.from_pretrained(str(file.parent) if file.name == "config.json" else str(file))


def architecture_class(config: Any) -> type | None:
    """The transformers class named by `config.architectures[0]`, or None (no architecture, or one this transformers
    does not have)."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    return getattr(transformers, architectures[0], None) if architectures else None


def build_meta_model(source: Any, auto_class: str | None = None, *, converted: bool = False) -> nn.Module:
    """Build a model on the meta device from its config: no weights, no memory.

    The class is the transformers auto class `auto_class` when given (e.g. `"AutoModelForSequenceClassification"`,
    which names the weights as the fine-tuned task model does); otherwise `config.architectures[0]`, or `AutoModel`
    (the bare backbone, without a task head, with a warning) when the config names no class transformers has.

    Args:
        source (`str`, `os.PathLike` or `PretrainedConfig`): A config, a `config.json`, or a folder holding one.
        auto_class (`str`, *optional*): Name of a transformers auto class.
        converted (`bool`, defaults to `False`): When the config records an hf_galore format (a checkpoint saved
            after WeLore's split or Q-GaLore's INT8 surgery), rebuild that structure as `from_pretrained` does (the
            format's `build` and `finish`), so the model has the converted modules and trainable set; otherwise the
            dense architecture is built. The format must be registered (`import hf_galore.methods`).

    Returns:
        `PreTrainedModel`: The model, with every parameter on the meta device.

    Raises:
        `FileNotFoundError`: `source` is a path holding no `config.json`.
        `ValueError` or `OSError`: transformers cannot parse the config.
    """

    config = load_config(source) if isinstance(source, (str, os.PathLike)) else source
    model = _build_dense_meta_model(config, auto_class)
    model_format = FORMATS.get(_quant_method(getattr(config, "quantization_config", None)) or "")
    if converted and model_format is not None:
        record = get_record(model, model_format.quant_method) or {}
        with torch.device("meta"):
            model_format.build(model, record)
        model_format.finish(model, record)
    return model


def _build_dense_meta_model(config: Any, auto_class: str | None) -> nn.Module:
    import transformers

    if auto_class is not None:
        cls = getattr(transformers, auto_class)
        logger.info("Building %s(%s) on the meta device.", auto_class, config.model_type)
        with torch.device("meta"):
            return cls.from_config(config)
    model_cls = architecture_class(config)
    if model_cls is None:
        architectures = getattr(config, "architectures", None) or []
        logger.warning(
            "%s; using AutoModel (the backbone without its task head; pick a task model class to include it).",
            f"transformers {transformers.__version__} has no class {architectures[0]!r}"
            if architectures
            else "The config names no `architectures`",
        )
    logger.info("Building %s on the meta device.", getattr(model_cls, "__name__", "AutoModel"))
    with torch.device("meta"):
        if model_cls is None:
            return transformers.AutoModel.from_config(config)
        # `_from_config` is what `from_config` of the auto classes calls: it honours the config's dtype and
        # attention settings without the auto-class lookup.
        if hasattr(model_cls, "_from_config"):
            return model_cls._from_config(config)
        return model_cls.from_config(config)


def load_dense_model(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The model of a local folder, with its weights, as `config.architectures[0]` (else `AutoModel`).

    `kwargs` go to `from_pretrained` (e.g. `dtype`).
    """
    import transformers

    config = load_config(path)
    model_cls = architecture_class(config) or transformers.AutoModel
    return model_cls.from_pretrained(os.fspath(path), config=config, **kwargs)


def renamed_argument(kwargs: dict[str, Any], old: str, new: str, value: Any, owner: str) -> Any:
    """`value`, or the value of the renamed keyword `old` popped from `kwargs` (with a `FutureWarning`).

    Lets a function keep accepting an argument's old name, e.g. `from_pretrained(path, model_cls=...)`.

    Raises:
        `TypeError`: both names were given.
    """
    if old not in kwargs:
        return value
    if value is not None:
        raise TypeError(f"{owner}() got both {new!r} and its old name {old!r}; pass {new!r} only.")
    warnings.warn(
        f"{owner}(): the argument {old!r} is renamed {new!r}; the old name will be removed in a future release.",
        FutureWarning,
        stacklevel=3,
    )
    return kwargs.pop(old)


# ------------------------------------------------------------------------------------------------------------------
# Format guards
# ------------------------------------------------------------------------------------------------------------------


def add_format_guards(state_dict: dict[str, torch.Tensor], module_names: list[str]) -> dict[str, torch.Tensor]:
    """`state_dict` plus an empty guard tensor under `<module>.weight` for every converted module (see module doc)."""
    guarded = dict(state_dict)
    for name in module_names:
        guarded.setdefault(f"{name}.{GUARD_KEY}", torch.empty(0))
    return guarded


def guard_patterns(module_names: list[str]) -> list[str]:
    """Regexes of the guard keys, in the form of transformers' `_keys_to_ignore_on_load_unexpected`."""
    return [rf"(^|\.){re.escape(name)}\.{GUARD_KEY}$" for name in module_names]


def _ignore_guard_keys(model: nn.Module, module_names: list[str]) -> None:
    existing = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    patterns = guard_patterns(module_names)
    if isinstance(existing, set):  # transformers 5.x keeps a set (and unions it with a set)
        model._keys_to_ignore_on_load_unexpected = existing | set(patterns)
    else:  # 4.x: a list or None (concatenated with a list)
        model._keys_to_ignore_on_load_unexpected = [*(existing or []), *patterns]


# ------------------------------------------------------------------------------------------------------------------
# transformers' quantizer registry
# ------------------------------------------------------------------------------------------------------------------

_REGISTERED_WITH_TRANSFORMERS = False


@functools.lru_cache(maxsize=1)
def _base_classes() -> tuple[type, type] | None:
    """transformers' `(QuantizationConfigMixin, HfQuantizer)`, or None where the quantizer API is missing."""
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return None
    return QuantizationConfigMixin, HfQuantizer


_CLASSES: dict[str, tuple[type, type]] = {}


def _transformers_classes() -> dict[str, tuple[type, type]] | None:
    """`{quant_method: (config class, quantizer class)}` for every registered format, built on first use."""
    bases = _base_classes()
    if bases is None:
        return None
    for quant_method, model_format in FORMATS.items():
        if quant_method not in _CLASSES:
            _CLASSES[quant_method] = _make_classes(model_format, *bases)
    return _CLASSES


def _make_classes(model_format: ModelFormat, config_base: type, quantizer_base: type) -> tuple[type, type]:
    """The `QuantizationConfigMixin` / `HfQuantizer` pair of one format (subclassed here, as their bases live in
    transformers, which this module imports lazily)."""
    quant_method = model_format.quant_method

    class HfGaloreQuantizationConfig(config_base):
        """The record of a converted model; every key of the record is an attribute (serialised as is)."""

        def __init__(self, **record: Any) -> None:
            record.pop("quant_method", None)
            self.__dict__.update(record)
            self.quant_method = quant_method

        def record(self) -> dict[str, Any]:
            return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "quant_method"}

    class HfGaloreQuantizer(quantizer_base):
        """Rebuilds the recorded structure before the weights load and finishes it after (see the module doc).

        The signatures accept both the transformers 4.57 and the 5.x forms (extra keyword arguments are ignored).
        """

        requires_calibration = False
        requires_parameters_quantization = False  # transformers 4.x: plain tensors, loaded as they are

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            version = getattr(self.quantization_config, "format_version", None)
            if version != FORMAT_VERSION:
                raise InvalidConfigError(
                    f"This {model_format.name} checkpoint has format_version={version!r}; this hf_galore reads "
                    f"format_version={FORMAT_VERSION}. Load it with the hf_galore version that wrote it."
                )

        def update_torch_dtype(self, dtype: Any) -> Any:  # transformers 4.x name of update_dtype
            return dtype

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            record = self.quantization_config.record()
            model_format.build(model, record)
            _ignore_guard_keys(model, model_format.module_names(record))
            return model

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            model_format.finish(model, self.quantization_config.record())
            return model

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            return True

        def get_state_dict_and_metadata(self, model: nn.Module, safe_serialization: Any = False) -> tuple[dict, dict]:
            names = model_format.module_names(self.quantization_config.record())
            return add_format_guards(model.state_dict(), names), {}

        def _dequantize(self, model: nn.Module, dtype: Any = None) -> nn.Module:
            return model_format.merge(model)

    suffix = "".join(part.title() for part in quant_method.removeprefix("hf_galore_").split("_"))
    HfGaloreQuantizationConfig.__name__ = HfGaloreQuantizationConfig.__qualname__ = f"{suffix}QuantizationConfig"
    HfGaloreQuantizer.__name__ = HfGaloreQuantizer.__qualname__ = f"{suffix}HfQuantizer"
    return HfGaloreQuantizationConfig, HfGaloreQuantizer


def _register_one(model_format: ModelFormat) -> None:
    from transformers.quantizers import auto

    classes = _transformers_classes()
    if classes is None:
        return
    config_cls, quantizer_cls = classes[model_format.quant_method]
    # The public decorators refuse a second registration; re-importing hf_galore (or a reload) must not fail.
    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(model_format.quant_method) is not config_cls:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(model_format.quant_method, None)
        auto.register_quantization_config(model_format.quant_method)(config_cls)
    if auto.AUTO_QUANTIZER_MAPPING.get(model_format.quant_method) is not quantizer_cls:
        auto.AUTO_QUANTIZER_MAPPING.pop(model_format.quant_method, None)
        auto.register_quantizer(model_format.quant_method)(quantizer_cls)


def register_with_transformers() -> bool:
    """Register every format with transformers' quantizer registry (idempotent); False where the API is missing."""
    global _REGISTERED_WITH_TRANSFORMERS
    try:
        from transformers.quantizers import auto
    except ImportError:
        return False
    if not all(hasattr(auto, f) for f in ("register_quantization_config", "register_quantizer")):
        logger.warning(
            "This transformers has no quantizer registry: stock from_pretrained cannot load hf_galore formats."
        )
        return False
    for model_format in FORMATS.values():
        _register_one(model_format)
    _REGISTERED_WITH_TRANSFORMERS = True
    return True


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


def from_pretrained(
    path: str | os.PathLike, quant_method: str, model_class: type | None = None, **kwargs: Any
) -> nn.Module:
    """Load a checkpoint of format `quant_method` with transformers' own `from_pretrained` (in eval mode).

    What the methods' `from_pretrained` wrappers call. It checks that the checkpoint has the format (with a clear
    error otherwise), reads a record written under the older `config.json` key, and picks `model_class` from
    `config.architectures[0]` when not given. `kwargs` go to `from_pretrained`.

    Raises:
        [`InvalidConfigError`]: the checkpoint is not of this format, or `config.architectures` names no class.
    """
    import transformers

    model_format = FORMATS[quant_method]
    path = os.fspath(path)
    if not register_with_transformers():
        raise InvalidConfigError(
            f"The installed transformers {transformers.__version__} has no quantizer registry; {model_format.name} "
            f"checkpoints need a supported transformers: {transformers_install_hint()}"
        )
    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path)
    legacy = getattr(config, model_format.legacy_config_key, None) if model_format.legacy_config_key else None
    if _quant_method(getattr(config, "quantization_config", None)) != quant_method:
        if not isinstance(legacy, dict):
            raise InvalidConfigError(
                f"{path!r} is not a {model_format.name} checkpoint: its config.json has no quantization_config with "
                f"quant_method={quant_method!r}. Load it with the model class' own from_pretrained."
            )
        config.quantization_config = {"quant_method": quant_method, **legacy}
    if legacy is not None:
        delattr(config, model_format.legacy_config_key)
    if model_class is None:
        model_class = architecture_class(config)
        if model_class is None:
            raise InvalidConfigError(
                f"{path!r}: config.architectures={getattr(config, 'architectures', None)!r} names no transformers "
                "class; pass the model class, e.g. AutoModelForCausalLM."
            )
    return model_class.from_pretrained(path, config=config, **kwargs).eval()
