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
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InvalidConfigError

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")
REFRESH_SIGNS = ("svd", "canonical", "aligned", "rotate")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _check(condition: bool, message: str) -> None:
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
    _check(
        valid,
        f"{name}={value!r} is not valid: it must be a finite number in {interval}"
        + (" or none." if allow_none else "."),
    )


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
            A weight with min(m, n) ≤ rank gains nothing from projection and falls back to the plain inner update,
            still multiplied by `scale` (its step size stays the projected weights').
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
            Power iterations of the randomized range finder. With `oversample=32`, 1 keeps ≥ 0.995 of the exact
            top-r energy on every one of 111 real fine-tuning gradients (MiniLM, r = 8, 32, 128;
            `benchmarks/refresh_energy.py`), 2 keeps ≥ 0.9996; 0 drops to 0.88.
        oversample (`int`, defaults to 32):
            Extra random columns of the range finder. With 1 power iteration, 8 extra columns kept only 0.965 of
            the exact energy on the worst of those gradients at r = 8 (0.976 at r = 32); 32 costs a few percent
            more at large ranks and keeps ≥ 0.995.
        stagger (`bool`, defaults to `False`):
            Spread later refreshes of the projected weights evenly over the gap instead of refreshing all of
            them on the same step (the first basis is always computed on a weight's first step).
        seed (`int`, defaults to 0):
            Seed of the range finder's random test matrices (mixed with the weight's index and refresh count,
            so every run and every data-parallel rank draws the same matrices).
        basis_bits (`int`, defaults to 16):
            How the projection bases are stored between refreshes: 16 keeps them in the gradient's dtype; 8 or 4
            stores them quantized group-wise (asymmetric, fp32 scale and zero per `basis_group_size` elements; 4
            packed two per byte, as Q-GaLore does) and dequantizes them for each projection. For a LLaMA-7B shape
            at rank 1024 the bf16 bases take 1.75 GiB, 8-bit ones 0.89 GiB, 4-bit ones 0.46 GiB.
        basis_group_size (`int`, defaults to 256):
            Elements sharing one scale and zero of a quantized basis.
        refresh_signs (`str`, defaults to `"rotate"`):
            How a refreshed basis relates to the moments carried over from the previous one: `svd` keeps the
            decomposition's signs (galore-torch), `canonical` flips each vector so its largest entry is positive,
            `aligned` flips each vector whose dot product with the previous basis' vector is negative, `rotate`
            aligns and also rotates the moments into the new basis (the lowest loss on all three measured setups,
            `benchmarks/refresh_signs.py`; see docs/methods/galore.md).
    """

    section: ClassVar[str] = "GaLore projection"

    rank: int = field(default=128, metadata={"help": "Projection rank r."})
    update_proj_gap: int = field(default=200, metadata={"help": "Steps between subspace refreshes (T)."})
    scale: float = field(default=0.25, metadata={"help": "Scale α of the projected-back update."})
    proj_type: str = field(default="std", metadata={"help": f"Projected side, one of {PROJ_TYPES}."})
    svd: str = field(default="randomized", metadata={"help": f"Refresh method, one of {SVD_METHODS}."})
    power_iters: int = field(default=1, metadata={"help": "Power iterations of the randomized range finder."})
    oversample: int = field(default=32, metadata={"help": "Oversampling columns of the randomized range finder."})
    stagger: bool = field(default=False, metadata={"help": "Spread refreshes of different weights over the gap."})
    seed: int = field(default=0, metadata={"help": "Seed of the range finder's random test matrices."})
    basis_bits: int = field(default=16, metadata={"help": "Bits of the stored bases: 16 (gradient dtype), 8 or 4."})
    basis_group_size: int = field(default=256, metadata={"help": "Elements per scale/zero of 8/4-bit bases."})
    refresh_signs: str = field(
        default="rotate", metadata={"help": f"Basis signs at a refresh, one of {REFRESH_SIGNS}."}
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"rank must be a positive integer, got {self.rank}.")
        _check(
            self.basis_bits in (4, 8, 16),
            f"basis_bits={self.basis_bits} is not valid; choose 16 (bases in the gradient dtype), 8 or 4.",
        )
        _check(self.basis_group_size >= 1, f"basis_group_size must be ≥ 1, got {self.basis_group_size}.")
        _check(self.update_proj_gap >= 1, f"update_proj_gap must be ≥ 1, got {self.update_proj_gap}.")
        check_number("scale", self.scale, 0, low_open=True)
        _check(
            self.proj_type in PROJ_TYPES,
            f"proj_type={self.proj_type!r} is not valid; choose one of {', '.join(PROJ_TYPES)}.",
        )
        _check(self.svd in SVD_METHODS, f"svd={self.svd!r} is not valid; choose one of {', '.join(SVD_METHODS)}.")
        _check(
            self.refresh_signs in REFRESH_SIGNS,
            f"refresh_signs={self.refresh_signs!r} is not valid; choose one of {', '.join(REFRESH_SIGNS)}.",
        )
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
class MultiTensorConfig(_OptionsMixin):
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
        check_number("beta1", self.beta1, 0, 1, high_open=True, allow_none=True)
        check_number("clip_threshold", self.clip_threshold, 0, low_open=True)
        check_number("decay_rate", self.decay_rate, high=0, high_open=True)
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


@dataclass
class WeLoreConfig(_OptionsMixin):
    """Configuration of WeLore's one-shot weight compression and LRC fine-tuning (Jaiswal et al., 2024,
    arXiv:2407.11239).

    A single global threshold τ on the min–max normalised singular values of every targeted weight is solved so
    that the targeted weights lose `target_compression` of their parameters. Weights whose rank reduction exceeds
    `min_reduction` (and whose two factors are smaller than the dense weight) become Low-Rank Components (LRC, two
    trainable factors); the others are Non-Low-Rank Components (N-LRC), kept dense and frozen.

    These keys configure the model surgery, not the optimizer: `welore_adamw` is AdamW over whatever the split
    leaves trainable.

    Args:
        target_compression (`float`, defaults to 0.5):
            Fraction of the targeted weights' parameters to remove, in (0, 1). Measured in parameters (a rank-k
            factor pair of an m×n weight holds k(m+n) values), not in ranks; the rank view is reported too.
        min_reduction (`float`, defaults to 0.5):
            A weight is an LRC when its rank reduction (pruned ranks / min(m, n)) exceeds this, in [0, 1). 0.5 is the
            paper's fine-tuning setting (a square matrix's two factors start to save memory there). A weight whose
            factors would not be smaller than the dense matrix always stays N-LRC, whatever this value.
        train_norms (`bool`, defaults to `False`):
            Also train LayerNorm/RMSNorm weights (the paper's continual fine-tuning does; frozen here unless asked).
        train_biases (`bool`, defaults to `False`):
            Also train biases outside the heads, including those of N-LRC Linears (BitFit-style).
        train_embeddings (`bool`, defaults to `False`):
            Also train the input/position/token-type embeddings.
        train_heads (`bool`, defaults to `False`):
            Also train the output head / task classifier (`lm_head`, `classifier.*`, `score`, ...). Set it when the
            head is freshly initialised for a new task. Heads are never compressed.
    """

    section: ClassVar[str] = "WeLore split"
    #: The keys describe model surgery: [`make_optimizer_kwargs`] must not pass them to the optimizer.
    optimizer_kwargs: ClassVar[bool] = False

    target_compression: float = field(
        default=0.5, metadata={"help": "Fraction of the targeted weights' parameters to remove, in (0, 1)."}
    )
    min_reduction: float = field(
        default=0.5, metadata={"help": "Rank-reduction ratio above which a weight becomes a trainable LRC."}
    )
    train_norms: bool = field(default=False, metadata={"help": "Also train LayerNorm/RMSNorm weights."})
    train_biases: bool = field(default=False, metadata={"help": "Also train biases outside the heads."})
    train_embeddings: bool = field(default=False, metadata={"help": "Also train the embeddings."})
    train_heads: bool = field(default=False, metadata={"help": "Also train the output head / classifier."})

    def __post_init__(self) -> None:
        _check(
            isinstance(self.target_compression, (int, float)) and 0.0 < self.target_compression < 1.0,
            f"target_compression must be in the open interval (0, 1), got {self.target_compression!r}. "
            "It is the fraction of the targeted weights' parameters to remove, e.g. target_compression=0.5.",
        )
        _check(
            isinstance(self.min_reduction, (int, float)) and 0.0 <= self.min_reduction < 1.0,
            f"min_reduction must be in [0, 1), got {self.min_reduction!r}. It is the rank-reduction ratio above "
            "which a weight becomes a trainable LRC, e.g. min_reduction=0.5 (the paper's value).",
        )


@dataclass
class QGaLoreConfig(_OptionsMixin):
    """Configuration of Q-GaLore (Zhang et al., 2024, arXiv:2407.08296): GaLore with INT8 weights, INT4 bases and
    a lazy, layer-adaptive subspace refresh.

    The defaults are the paper's (`--proj_bits 4 --proj_group_size 256 --weight_bits 8 --weight_group_size 256
    --cos_threshold 0.4 --gamma_proj 2 --queue_size 5`), plus a cap on the refresh gap that the published code lacks.

    Args:
        proj_bits (`int`, defaults to 4):
            Bits of the stored projection bases, 4 (packed two per byte) or 8. The bases are dequantized for each
            projection; the gradients and the SVD stay in full precision.
        proj_group_size (`int`, defaults to 256):
            Elements of a basis sharing one fp32 scale and zero.
        weight_bits (`int`, defaults to 8):
            Bits of the targeted Linear weights (only 8 is supported).
        weight_group_size (`int`, defaults to 256):
            Elements (row-major) of an INT8 weight sharing one fp32 scale and zero.
        stochastic_round (`bool`, defaults to `True`):
            Requantize updated INT8 weights with stochastic rounding (unbiased, so updates smaller than a
            quantization step are not lost); `false` rounds to nearest.
        cos_threshold (`float`, defaults to 0.4):
            A weight's refresh gap grows when the mean |cosine similarity| between the leading singular vectors of
            successive bases, over the last `queue_size` refreshes, is at least this, in [0, 1].
        gamma_proj (`float`, defaults to 2.0):
            Factor by which a stable weight's refresh gap grows (≥ 1; 1 disables the lazy refresh).
        queue_size (`int`, defaults to 5):
            Number of successive similarities averaged before the gap may grow; the queue restarts after a growth,
            so every growth needs `queue_size` fresh confirmations.
        max_proj_gap (`int`, *optional*):
            Upper bound of a weight's refresh gap; `None` means 16 × `update_proj_gap`.
        sr_seed (`int`, defaults to 0):
            Seed of the stochastic rounding, mixed with the step and the weight's index, so every data-parallel rank
            rounds identically and a resumed run reproduces an uninterrupted one.
    """

    section: ClassVar[str] = "Q-GaLore quantization"

    proj_bits: int = field(default=4, metadata={"help": "Bits of the stored projection bases (4 packed, or 8)."})
    proj_group_size: int = field(default=256, metadata={"help": "Elements per scale/zero of the bases."})
    weight_bits: int = field(default=8, metadata={"help": "Bits of the targeted Linear weights (8)."})
    weight_group_size: int = field(default=256, metadata={"help": "Elements per scale/zero of the INT8 weights."})
    stochastic_round: bool = field(default=True, metadata={"help": "Stochastic rounding of the INT8 weight update."})
    cos_threshold: float = field(default=0.4, metadata={"help": "Mean |cos| above which the refresh gap grows."})
    gamma_proj: float = field(default=2.0, metadata={"help": "Growth factor of a stable weight's refresh gap."})
    queue_size: int = field(default=5, metadata={"help": "Similarities averaged before the gap may grow."})
    max_proj_gap: int | None = field(default=None, metadata={"help": "Cap of the refresh gap (none: 16×gap)."})
    sr_seed: int = field(default=0, metadata={"help": "Seed of the stochastic rounding."})

    def __post_init__(self) -> None:
        _check(self.proj_bits in (4, 8), f"proj_bits={self.proj_bits} is not valid; choose 4 or 8.")
        _check(
            self.weight_bits == 8, f"weight_bits={self.weight_bits} is not supported; only 8 is (set weight_bits=8)."
        )
        for name in ("proj_group_size", "weight_group_size", "queue_size"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be a positive integer, got {value}.")
        check_number("cos_threshold", self.cos_threshold, 0, 1)
        check_number("gamma_proj", self.gamma_proj, 1)  # 1 disables the lazy refresh
        _check(
            self.max_proj_gap is None or self.max_proj_gap >= 1,
            f"max_proj_gap must be ≥ 1 or none, got {self.max_proj_gap}.",
        )


FLORA_PROJ_TYPES = ("std", "reverse_std", "left", "right")


@dataclass
class FloraConfig(_OptionsMixin):
    """Configuration of FLoRA's random-projection compression (Hao et al., 2024, arXiv:2402.03293).

    Each targeted m×n weight keeps its first moment compressed through a Gaussian random projection (r×n or m×r)
    that is regenerated from a seed, never stored, and resampled every `kappa` optimizer steps. With gradient
    accumulation, micro-step gradients are also accumulated compressed (see [`FloraAccumulationConfig`]).

    Args:
        rank (`int`, defaults to 128):
            Rank r of the random projections. Must not exceed min(m, n) of any targeted weight (a weight with
            min(m, n) = rank falls back to the plain update: compressing it would save nothing).
        kappa (`int`, defaults to 1000):
            Optimizer steps between two resamplings of the momentum projection (κ in the paper); the compressed
            momentum is carried over to the new projection at each resampling.
        proj_type (`str`, defaults to `"std"`):
            Which side is compressed: `std` the smaller dimension (left when m < n, right otherwise), `reverse_std`
            the larger one, `left`/`right` force a side. FLoRA's projections are one-sided, so `full` is not valid.
        seed (`int`, defaults to 0):
            Base seed of the projections, mixed with the weight's index and a resampling counter, so every run and
            every data-parallel rank regenerates the same matrices.
    """

    section: ClassVar[str] = "FLoRA projection"

    rank: int = field(default=128, metadata={"help": "Rank r of the random projections."})
    kappa: int = field(default=1000, metadata={"help": "Steps between momentum-projection resamplings (κ)."})
    proj_type: str = field(default="std", metadata={"help": f"Compressed side, one of {FLORA_PROJ_TYPES}."})
    seed: int = field(default=0, metadata={"help": "Base seed of the random projections."})

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"rank must be a positive integer, got {self.rank}. Set e.g. optim_args='rank=64'.")
        _check(
            self.kappa >= 1,
            f"kappa must be a positive integer (steps between resamplings), got {self.kappa}. "
            "Set e.g. optim_args='kappa=1000'.",
        )
        _check(
            self.proj_type in FLORA_PROJ_TYPES,
            f"proj_type={self.proj_type!r} is not valid for FLoRA; choose one of {', '.join(FLORA_PROJ_TYPES)}.",
        )
        _check(self.seed >= 0, f"seed must be ≥ 0, got {self.seed}.")


@dataclass
class FloraAdafactorConfig(AdafactorConfig):
    """Adafactor knobs of `flora_adafactor`: those of [`AdafactorConfig`], with momentum on by default.

    FLoRA's point is a compressed first moment, so `beta1` defaults to 0.9 here (`beta1=none` gives plain
    Adafactor, with nothing to compress).
    """

    beta1: float | None = field(default=0.9, metadata={"help": "First-moment coefficient (none = no momentum)."})


FLORA_ACCUMULATION = ("compressed", "full")


@dataclass
class FloraAccumulationConfig(_OptionsMixin):
    """How FLoRA accumulates gradients over `gradient_accumulation_steps` (checked before training; not an optimizer
    hyperparameter).

    Args:
        accumulation (`str`, defaults to `"compressed"`):
            `compressed`: micro-step gradients of the targeted weights are accumulated as m×r (or r×n) random
            projections in backward hooks (every FLoRA name; refuses fp16 and `nn.DataParallel`). `full`: let the
            Trainer accumulate full-size gradients (non-layer-wise names only; only the momentum is compressed).
    """

    section: ClassVar[str] = "FLoRA accumulation"
    optimizer_kwargs: ClassVar[bool] = False

    accumulation: str = field(
        default="compressed", metadata={"help": f"Gradient accumulation, one of {FLORA_ACCUMULATION}."}
    )

    def __post_init__(self) -> None:
        _check(
            self.accumulation in FLORA_ACCUMULATION,
            f"accumulation={self.accumulation!r} is not valid; choose one of {', '.join(FLORA_ACCUMULATION)}.",
        )
