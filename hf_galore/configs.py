"""Validated configuration dataclasses, one per method, parsed from transformers' `optim_args` string.

`TrainingArguments(optim_args="rank=8, update_proj_gap=200, scale=2, proj_type=std")` reaches us as a dict of
strings; [`parse_optim_args`] converts each value to the field's type, rejects unknown keys with the list of valid
ones, and runs each dataclass' `__post_init__` range checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InvalidConfigError
from .utils.deprecation import moved_attributes

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def check_condition(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidConfigError(message)


def _bound(value: float) -> str:
    return "∞" if value == math.inf else "-∞" if value == -math.inf else f"{value:g}"


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise [`InvalidConfigError`] unless `value` is a finite real number in the interval [`low`, `high`] (ends
    excluded when open); a NaN or an infinity is never valid, whatever the bounds.

    The message names the key, the value and the valid range.
    """
    if value is None and allow_none:
        return
    low_open, high_open = low_open or low == -math.inf, high_open or high == math.inf
    interval = f"{'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    valid = (
        number
        and math.isfinite(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    check_condition(
        valid,
        f"{name}={value!r} is not valid: it must be a finite number in {interval}"
        + (" or none." if allow_none else "."),
    )


class OptionsMixin:
    """`to_dict`/`from_dict` and string parsing shared by every config dataclass."""

    section: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build the config from a dict; unknown keys raise [`InvalidConfigError`] listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise InvalidConfigError(_unknown_keys_message(unknown, names, cls.__name__))
        return cls(**values)

    @classmethod
    def field_docs(cls) -> list[tuple[str, str, Any, str]]:
        """`(name, type, default, help)` for every field, used by `hf-galore list` and the docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            rows.append((f.name, type_name, f.default, f.metadata.get("help", "")))
        return rows


def _unknown_keys_message(unknown: list[str], valid: list[str], owner: str) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (
        f"Unknown optim_args key(s) {', '.join(hints)} for {owner}. Valid keys are: {', '.join(sorted(valid))}. "
        "Fix the key in `TrainingArguments(optim_args=...)`."
    )


@dataclass
class Blockwise8bitConfig(OptionsMixin):
    """8-bit blockwise storage of the (low-rank) optimizer states, through bitsandbytes' public functional API.

    Args:
        block_size (`int`, defaults to 256):
            Elements sharing one absmax scale.
        min_8bit_size (`int`, defaults to 4096):
            States with fewer elements stay in fp32 (quantising them saves nothing worth the error).
    """

    section: ClassVar[str] = "8-bit states"

    block_size: int = field(default=256, metadata={"help": "Elements per quantisation block."})
    min_8bit_size: int = field(default=4096, metadata={"help": "States smaller than this stay fp32."})

    def __post_init__(self) -> None:
        valid = (64, 128, 256, 512, 1024, 2048, 4096)
        check_condition(self.block_size in valid, f"block_size={self.block_size} is not valid; choose one of {valid}.")
        check_condition(self.min_8bit_size >= 0, f"min_8bit_size must be ≥ 0, got {self.min_8bit_size}.")


@dataclass
class MultiTensorConfig(OptionsMixin):
    """How the AdamW-style optimizers run their elementwise work.

    Args:
        foreach (`bool`, defaults to `True`):
            Batch the moment and denominator math of all parameters of a group into multi-tensor ops (and the 8-bit
            (de)quantisation into one call per chunk of states) instead of a Python loop over parameters. Same
            arithmetic, fewer kernel launches; it allocates fp32 temporaries for one chunk of at most 2**23 state
            elements at a time. `foreach=false` runs the per-parameter loop. Layer-wise optimizers update in
            backward hooks one weight at a time; for them it only batches the updates deferred to `step()`
            (gradient clipping, tied weights).
    """

    section: ClassVar[str] = "Batched step"

    foreach: bool = field(default=True, metadata={"help": "Batch elementwise work across parameters."})

    def __post_init__(self) -> None:
        # A truthy string or number given in Python would silently pick a path; `optim_args` strings are converted.
        check_condition(
            isinstance(self.foreach, bool), f"foreach={self.foreach!r} is not valid: it must be true or false."
        )


@dataclass
class AdafactorConfig(OptionsMixin):
    """Adafactor knobs of `galore_adafactor` (semantics of `transformers.Adafactor`).

    The defaults make the Trainer's learning rate and scheduler drive the update (`relative_step=False`,
    `scale_parameter=False`), as transformers does for its `galore_adafactor`.

    Args:
        beta1 (`float`, *optional*):
            First-moment coefficient; `None` (default) keeps no first moment.
        clip_threshold (`float`, defaults to 1.0):
            Threshold of the update's RMS clipping.
        decay_rate (`float`, defaults to -0.8):
            Exponent of the second-moment decay schedule β2ₜ = 1 − t^decay_rate.
        scale_parameter (`bool`, defaults to `False`):
            Multiply the lr by the weight's RMS (Adafactor's relative step size).
        relative_step (`bool`, defaults to `False`):
            Ignore the Trainer's lr and use Adafactor's 1/√t schedule.
        warmup_init (`bool`, defaults to `False`):
            With `relative_step`, warm the relative step up from 1e-6·t.
    """

    section: ClassVar[str] = "Adafactor"

    beta1: float | None = field(default=None, metadata={"help": "First-moment coefficient (none = no momentum)."})
    clip_threshold: float = field(default=1.0, metadata={"help": "RMS clipping threshold of the update."})
    decay_rate: float = field(default=-0.8, metadata={"help": "Second-moment decay exponent."})
    scale_parameter: bool = field(default=False, metadata={"help": "Scale lr by the weight RMS."})
    relative_step: bool = field(default=False, metadata={"help": "Use Adafactor's own 1/sqrt(t) step size."})
    warmup_init: bool = field(default=False, metadata={"help": "Warm-up of the relative step."})

    def __post_init__(self) -> None:
        check_number("beta1", self.beta1, 0, 1, high_open=True, allow_none=True)
        check_number("clip_threshold", self.clip_threshold, 0, low_open=True)
        check_number("decay_rate", self.decay_rate, high=0, high_open=True)
        check_condition(not self.warmup_init or self.relative_step, "warmup_init=true needs relative_step=true.")


def _convert(value: str, annotation: Any, key: str) -> Any:
    """Convert the string `value` of `optim_args` to `annotation` (int, float, bool, str, or `X | None`)."""
    args = typing.get_args(annotation)
    if args and type(None) in args:
        if value.lower() in {"none", "null", ""}:
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            low = value.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(value)
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
        return str(value)
    except ValueError:
        type_name = getattr(annotation, "__name__", str(annotation))
        raise InvalidConfigError(f"optim_args key {key!r} expects a {type_name}, got {value!r}.") from None


def split_optim_args(optim_args: str | dict[str, Any] | None) -> dict[str, str]:
    """Split transformers' `"k=v, k2=v2"` string into a dict (a dict is returned as a copy).

    The grammar is transformers' own (spaces removed, items split on commas, each exactly `key=value`), checked
    strictly: a string this accepts is one transformers' parser accepts too, so a malformed item (`"rank"`,
    `"rank=4=5"`, a trailing or doubled comma) gets this clear error instead of transformers' `not enough values to
    unpack` from inside `Trainer.create_optimizer`.

    Raises:
        [`InvalidConfigError`]: naming the malformed item, the whole string and the expected form.
    """
    if optim_args is None:
        return {}
    if isinstance(optim_args, dict):
        return {str(k): v for k, v in optim_args.items()}
    result: dict[str, str] = {}
    if not optim_args:
        return result
    for item in optim_args.replace(" ", "").split(","):
        if item.count("=") != 1 or not item.split("=")[0]:
            problem = "an empty item (a trailing or doubled comma)" if not item else f"the item {item!r}"
            raise InvalidConfigError(
                f"optim_args={optim_args!r} has {problem}; every comma-separated item must be key=value with one "
                "'=' and no empty items, e.g. optim_args=\"rank=8, update_proj_gap=200\". Fix the string in "
                "`TrainingArguments(optim_args=...)`."
            )
        key, value = item.split("=")
        result[key] = value
    return result


def parse_optim_args(
    optim_args: str | dict[str, Any] | None, config_classes: typing.Sequence[type], optim_name: str = "this optimizer"
) -> list[Any]:
    """Parse `optim_args` into one instance of each of `config_classes`.

    Values that are strings are converted to each field's type; values that already have a type are kept.

    Raises:
        [`InvalidConfigError`]: on an unknown key (the message lists the valid ones), an unconvertible value, or a
            value out of range.
    """
    raw = split_optim_args(optim_args)
    owners: dict[str, type] = {}
    for cls in config_classes:
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, cls)
    unknown = [k for k in raw if k not in owners]
    if unknown:
        raise InvalidConfigError(_unknown_keys_message(unknown, list(owners), f"optim={optim_name!r}"))
    configs = []
    for cls in config_classes:
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in raw.items():
            if owners[key] is cls:
                values[key] = _convert(value, hints[key], key) if isinstance(value, str) else value
        configs.append(cls(**values))
    return configs


def optimizer_kwargs(configs: Sequence[Any]) -> dict[str, Any]:
    """The optimizer constructor's keyword arguments from parsed configs: every field of each config, except the
    configs of a model transform (`optimizer_kwargs = False`, e.g. `WeLoreConfig`)."""
    kwargs: dict[str, Any] = {}
    for config in configs:
        if getattr(config, "optimizer_kwargs", True):
            kwargs.update(config.to_dict())
    return kwargs


def find_config(configs: Sequence[Any], config_cls: type, default: Any = None) -> Any:
    """The instance of `config_cls` (or of a subclass) among parsed `configs`, else `default`."""
    return next((c for c in configs if isinstance(c, config_cls)), default)


# Deprecated: the method configs moved to their method's folder (`hf_galore.methods.<method>.config`).
__getattr__ = moved_attributes(
    __name__,
    {
        "GaLoreConfig": "hf_galore.methods.galore.config",
        "QGaLoreConfig": "hf_galore.methods.q_galore.config",
        "FloraConfig": "hf_galore.methods.flora.config",
        "FloraAdafactorConfig": "hf_galore.methods.flora.config",
        "FloraAccumulationConfig": "hf_galore.methods.flora.config",
        "WeLoreConfig": "hf_galore.methods.welore.config",
        "PROJ_TYPES": "hf_galore.methods.galore.config",
        "SVD_METHODS": "hf_galore.methods.galore.config",
        "REFRESH_SIGNS": "hf_galore.methods.galore.config",
        "FLORA_PROJ_TYPES": "hf_galore.methods.flora.config",
        "FLORA_ACCUMULATION": "hf_galore.methods.flora.config",
    },
)
