"""Validated configuration dataclasses, one per method, parsed from transformers' `optim_args` string.

`TrainingArguments(optim_args="rank=8, update_proj_gap=200, scale=2, proj_type=std")` reaches us as a dict of
strings; [`parse_optim_args`] converts each value to the field's type, rejects unknown keys with the list of valid
ones, and runs each dataclass' `__post_init__` range checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InvalidConfigError

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidConfigError(message)


class _OptionsMixin:
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
class GaLoreConfig(_OptionsMixin):
    """Configuration of GaLore's gradient low-rank projection (Zhao et al., 2024, arXiv:2403.03507).

    The defaults equal transformers' built-in GaLore defaults, so existing `optim_args` strings keep their meaning.

    Args:
        rank (`int`, defaults to 128):
            Rank r of the projection. Optimizer states of a projected m×n weight are r×max(m, n) instead of m×n.
            A weight with min(m, n) ≤ rank gains nothing from projection and falls back to the plain inner update.
        update_proj_gap (`int`, defaults to 200):
            Optimizer steps between two subspace refreshes (T in the paper).
        scale (`float`, defaults to 0.25):
            α: the projected-back update is multiplied by it, so projected weights see an effective lr of lr·α.
        proj_type (`str`, defaults to `"std"`):
            Which side is projected: `std` projects the smaller dimension (left when m < n, right otherwise),
            `reverse_std` the larger one, `left`/`right` force a side, `full` projects both (r×r states).
        svd (`str`, defaults to `"randomized"`):
            How the top-r basis is found at a refresh: `randomized` (range finder, ms even for 4096×11008) or
            `exact` (full fp32 SVD, as in the reference implementation; seconds on large matrices).
        power_iters (`int`, defaults to 1):
            Power iterations of the randomized range finder. 1 keeps ≥ 0.987 of the exact top-r energy on real
            LLM gradients, 2 keeps ≥ 0.996.
        oversample (`int`, defaults to 8):
            Extra random columns of the range finder.
        stagger (`bool`, defaults to `False`):
            Spread later refreshes of the projected weights evenly over the gap instead of refreshing all of
            them on the same step (the first basis is always computed on a weight's first step).
        seed (`int`, defaults to 0):
            Seed of the range finder's random test matrices (mixed with the weight's index and refresh count,
            so every run and every data-parallel rank draws the same matrices).
    """

    section: ClassVar[str] = "GaLore projection"

    rank: int = field(default=128, metadata={"help": "Projection rank r."})
    update_proj_gap: int = field(default=200, metadata={"help": "Steps between subspace refreshes (T)."})
    scale: float = field(default=0.25, metadata={"help": "Scale α of the projected-back update."})
    proj_type: str = field(default="std", metadata={"help": f"Projected side, one of {PROJ_TYPES}."})
    svd: str = field(default="randomized", metadata={"help": f"Refresh method, one of {SVD_METHODS}."})
    power_iters: int = field(default=1, metadata={"help": "Power iterations of the randomized range finder."})
    oversample: int = field(default=8, metadata={"help": "Oversampling columns of the randomized range finder."})
    stagger: bool = field(default=False, metadata={"help": "Spread refreshes of different weights over the gap."})
    seed: int = field(default=0, metadata={"help": "Seed of the range finder's random test matrices."})

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"rank must be a positive integer, got {self.rank}.")
        _check(self.update_proj_gap >= 1, f"update_proj_gap must be ≥ 1, got {self.update_proj_gap}.")
        _check(self.scale > 0, f"scale must be > 0, got {self.scale}.")
        _check(
            self.proj_type in PROJ_TYPES,
            f"proj_type={self.proj_type!r} is not valid; choose one of {', '.join(PROJ_TYPES)}.",
        )
        _check(self.svd in SVD_METHODS, f"svd={self.svd!r} is not valid; choose one of {', '.join(SVD_METHODS)}.")
        _check(self.power_iters >= 0, f"power_iters must be ≥ 0, got {self.power_iters}.")
        _check(self.oversample >= 0, f"oversample must be ≥ 0, got {self.oversample}.")


@dataclass
class Blockwise8bitConfig(_OptionsMixin):
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
        _check(self.block_size in valid, f"block_size={self.block_size} is not valid; choose one of {valid}.")
        _check(self.min_8bit_size >= 0, f"min_8bit_size must be ≥ 0, got {self.min_8bit_size}.")


@dataclass
class AdafactorConfig(_OptionsMixin):
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
        _check(self.beta1 is None or 0.0 <= self.beta1 < 1.0, f"beta1 must be in [0, 1), got {self.beta1}.")
        _check(self.clip_threshold > 0, f"clip_threshold must be > 0, got {self.clip_threshold}.")
        _check(self.decay_rate < 0, f"decay_rate must be < 0, got {self.decay_rate}.")
        _check(not self.warmup_init or self.relative_step, "warmup_init=true needs relative_step=true.")


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
    """Split transformers' `"k=v, k2=v2"` string into a dict (a dict is returned as a copy)."""
    if optim_args is None:
        return {}
    if isinstance(optim_args, dict):
        return {str(k): v for k, v in optim_args.items()}
    result: dict[str, str] = {}
    for item in optim_args.replace(" ", "").split(","):
        if not item:
            continue
        if item.count("=") != 1:
            raise InvalidConfigError(f"optim_args entry {item!r} is not of the form key=value (e.g. 'rank=8').")
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
