"""Which weights get low-rank treatment: transformers' `optim_target_modules` semantics.

`optim_target_modules` is a `TrainingArguments` field, so its meaning is transformers' (its
`check_target_module_exists`), for every `optim=` name:

* `"all-linear"` (or `"all_linear"`) selects every `nn.Linear`. Under transformers' own names (`galore_*`) that
  includes the output head (`lm_head`, classifiers), as in transformers; under hf_galore's own names (`q_galore_*`,
  `flora_*`, `welore_*`) the head is left out (see [`HEAD_NAMES`]), as those methods' papers do;
* any other string is a regular expression matched with `re.fullmatch` against each module's qualified name;
* a list (or tuple) of strings matches a module whose name equals an entry, **contains** an entry as a substring,
  or is fully matched by an entry used as a regular expression (`["attn", "mlp"]`, `[r".*attn.*", r".*mlp.*"]`).

Only trainable `nn.Linear` weights are targeted. Quantized bitsandbytes Linears and PEFT's LoRA internals
(`lora_A`, `lora_B`, `base_layer`) are `nn.Linear` subclasses but are never projected, however they are matched.
A matched module that is not projected is listed in `TargetResolution.skipped` with a [`SkipReason`] (its message,
plus a [`SkipKind`] that code compares instead of the wording) and logged in one WARNING line;
like transformers, a non-Linear module matched only through a regular expression (a container such as
`self_attn` under `r".*attn.*"`) is not reported. An invalid regular expression raises [`InvalidConfigError`].
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InvalidConfigError, NoTargetModulesError

logger = logging.getLogger(__name__)

ALL_LINEAR = ("all-linear", "all_linear")

#: Top-level or trailing module names of task heads that `all-linear` leaves out (unless `include_heads=True`).
HEAD_NAMES = ("lm_head", "classifier", "classification_head", "score", "qa_outputs", "cls")

_PEFT_INTERNALS = re.compile(r"(^|\.)(lora_[A-Za-z_]+|base_layer|lora_magnitude_vector)(\.|$)")

TargetSpec = str | Sequence[str]

#: How a module was matched: by name (exact or substring: reported when it cannot be projected) or by a regex.
_BY_NAME, _BY_REGEX = "name", "regex"


@dataclass
class TargetResolution:
    """Result of resolving `optim_target_modules` against a model.

    Attributes:
        modules: `(qualified name, module)` of every targeted Linear, in model order.
        skipped: `(qualified name, reason)` of matched modules that are not projected (logged as a warning).
        ignored: `(qualified name, reason)` of non-Linear modules matched only through a regular expression
            (containers, activations): transformers ignores them silently, and so does the log; `hf-galore
            check-targets` lists them with the skipped ones.
    """

    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]

    def weights(self) -> list[nn.Parameter]:
        """The targeted weights, each once (a weight shared by two targeted modules must be stepped once)."""
        unique: dict[int, nn.Parameter] = {}
        for _, module in self.modules:
            unique.setdefault(id(module.weight), module.weight)
        return list(unique.values())


def is_head(name: str, module: nn.Module, output_module: nn.Module | None) -> bool:
    if output_module is not None and module is output_module:
        return True
    return any(part in HEAD_NAMES for part in name.split("."))


class SkipKind(str, enum.Enum):
    """Why a matched module is not projected, as a value code can compare (the message is for people)."""

    PEFT_LAYER = "peft_layer"
    PEFT_INTERNALS = "peft_internals"
    NOT_LINEAR = "not_linear"
    QUANTIZED = "quantized"
    FROZEN = "frozen"
    NON_FLOATING = "non_floating"


class SkipReason(str):
    """The reason a matched module is skipped: the message (a `str`, printed and compared as before) that also
    carries its [`SkipKind`] and the module's class name, so code filters on `kind`, never on the wording.

    Attributes:
        kind: The [`SkipKind`] (None for a plain message).
        module_type: The skipped module's class name (e.g. `"Conv1D"`).
    """

    kind: SkipKind | None
    module_type: str

    def __new__(cls, message: str, kind: SkipKind | None = None, module_type: str = "") -> SkipReason:
        reason = super().__new__(cls, message)
        reason.kind, reason.module_type = kind, module_type
        return reason


_PEFT_REASON = "PEFT adapter internals (LoRA factors are already low-rank)"
_PEFT_KINDS = (SkipKind.PEFT_LAYER, SkipKind.PEFT_INTERNALS)


def _skip_reason(name: str, module: nn.Module) -> SkipReason | None:
    module_type = type(module).__name__
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        # A PEFT tuner layer (e.g. `peft.tuners.lora.Linear`) wrapping a frozen base Linear.
        message = f"PEFT adapter layer ({module_type}; its base_layer is frozen, its factors are low-rank)"
        return SkipReason(message, SkipKind.PEFT_LAYER, module_type)
    if not isinstance(module, nn.Linear):
        return SkipReason(f"not an nn.Linear ({module_type})", SkipKind.NOT_LINEAR, module_type)
    if type(module).__module__.startswith("bitsandbytes"):
        message = f"quantized bitsandbytes layer ({module_type}); its weight is not trainable in full rank"
        return SkipReason(message, SkipKind.QUANTIZED, module_type)
    if _PEFT_INTERNALS.search(name):
        return SkipReason(_PEFT_REASON, SkipKind.PEFT_INTERNALS, module_type)
    weight = module.weight
    if not weight.requires_grad:
        return SkipReason("frozen (requires_grad=False)", SkipKind.FROZEN, module_type)
    if not torch.is_floating_point(weight):
        return SkipReason(f"non-floating weight ({weight.dtype})", SkipKind.NON_FLOATING, module_type)
    return None


_FIX = (
    'Pass "all-linear", one regular expression matched against the whole module name (e.g. r".*(attn|mlp).*"), '
    'or a list of module names, substrings or regular expressions (e.g. ["q_proj", "v_proj"]).'
)


def _compile(pattern: str, value: object) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidConfigError(
            f"optim_target_modules={value!r}: {pattern!r} is not a valid regular expression ({exc}). Escape regex "
            f"characters that should match literally (re.escape, or a backslash before . ( [ + *). {_FIX}"
        ) from None


@dataclass(frozen=True)
class _Matcher:
    """`optim_target_modules` validated and compiled once; `kind(name)` says whether and how a name matches."""

    value: object
    entries: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    is_string: bool

    @classmethod
    def of(cls, value: object) -> _Matcher:
        if isinstance(value, str):
            return cls(value, (value,), (_compile(value, value),), True)
        if not isinstance(value, (list, tuple)):
            raise InvalidConfigError(
                f"optim_target_modules={value!r} is not a string or a list of strings (got {type(value).__name__}). "
                f"{_FIX}"
            )
        wrong = [entry for entry in value if not isinstance(entry, str)]
        if wrong:
            raise InvalidConfigError(
                f"optim_target_modules={value!r} is not a string or a list of strings: entry {wrong[0]!r} is a "
                f"{type(wrong[0]).__name__}. {_FIX}"
            )
        entries = tuple(value)
        return cls(value, entries, tuple(_compile(entry, value) for entry in entries), False)

    def kind(self, name: str) -> str | None:
        """`_BY_NAME`, `_BY_REGEX` or None, in transformers' order: exact, substring (lists), then regex."""
        if self.is_string:
            if self.patterns[0].fullmatch(name) is None:
                return None
            return _BY_NAME if self.entries[0] == name else _BY_REGEX
        if name in self.entries or any(entry in name for entry in self.entries):
            return _BY_NAME
        if any(pattern.fullmatch(name) is not None for pattern in self.patterns):
            return _BY_REGEX
        return None


def matches_target(name: str, spec: TargetSpec) -> bool:
    """Whether module `name` is selected by `spec` (a regex string, or a list of names/substrings/regexes)."""
    return _Matcher.of(spec).kind(name) is not None


def output_module(model: nn.Module) -> nn.Module | None:
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is None:
        return None
    try:
        return get_output()
    except (NotImplementedError, AttributeError):
        return None


def _embedding_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def resolve_target_modules(
    model: nn.Module, targets: TargetSpec | None, exclude: Sequence[str] = (), include_heads: bool = False
) -> TargetResolution:
    """Resolve `targets` (as in `TrainingArguments.optim_target_modules`) to the Linear modules to project.

    Args:
        model (`nn.Module`): The model (a PEFT model works too: adapter internals are skipped).
        targets (`str`, `list[str]` or `tuple[str, ...]`): `"all-linear"`, a regex matched against the whole
            module name, or a list of entries each matching a module by exact name, substring or regex fullmatch.
        exclude (`list[str]`, *optional*): Modules to leave out, matched with the same list rule.
        include_heads (`bool`, defaults to `False`): With `"all-linear"`, also project output heads/classifiers
            (transformers' `all-linear`; the Trainer passes `True` under transformers' `galore_*` names). A head
            whose weight is tied to an input embedding is still left out, as transformers never projects it.

    Raises:
        [`NoTargetModulesError`]: when nothing trainable matched; the message lists the given value and a few
            Linear module names that exist.
        [`InvalidConfigError`]: when `targets` (or `exclude`) is not a string or list of strings, or holds an
            invalid regular expression.
    """
    if targets is None or (not isinstance(targets, str) and isinstance(targets, Sequence) and len(targets) == 0):
        raise NoTargetModulesError(
            "GaLore-family optimizers need `optim_target_modules` to know which weights to project, got "
            f"{targets!r}. {_FIX}"
        )
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    matcher = None if all_linear else _Matcher.of(targets)
    excluded = _Matcher.of(list(exclude)) if exclude else None
    head_owner = output_module(model)
    tied_to_embedding = _embedding_weight_ids(model) if all_linear and include_heads else set()
    resolution = TargetResolution()
    for name, module in model.named_modules():
        if not name:
            continue
        if matcher is None:
            if not isinstance(module, nn.Linear):
                continue
            if is_head(name, module, head_owner) and (not include_heads or id(module.weight) in tied_to_embedding):
                continue
            kind = _BY_NAME
        else:
            kind = matcher.kind(name)
            if kind is None:
                continue
        if excluded is not None and excluded.kind(name) is not None:
            continue
        reason = _skip_reason(name, module)
        if reason is None:
            resolution.modules.append((name, module))
        elif _PEFT_INTERNALS.search(name) and not isinstance(module, nn.Linear):
            continue  # PEFT's containers (lora_A ModuleDict, dropout, ...): their Linears are reported instead
        elif not isinstance(module, nn.Linear) and kind == _BY_REGEX and reason.kind not in _PEFT_KINDS:
            resolution.ignored.append((name, reason))  # a container caught by a loose regex: transformers is silent
        else:
            resolution.skipped.append((name, reason))
    if not resolution.modules:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        examples = ", ".join(linear_names[:6]) or "(the model has no nn.Linear)"
        skipped = f" Matched but skipped: {_summarize_skipped(resolution.skipped)}." if resolution.skipped else ""
        ignored = (
            f" Matched only non-Linear modules: {', '.join(name for name, _ in resolution.ignored[:4])}"
            + (f", … ({len(resolution.ignored)} in all)." if len(resolution.ignored) > 4 else ".")
            if resolution.ignored
            else ""
        )
        # A LoRA PeftModel has no full-size trainable Linear outside `modules_to_save`: say what to do instead.
        peft_hint = (
            " On a PEFT model the LoRA factors are already low-rank and always get the plain inner update; to "
            "project the full-size weights of `modules_to_save` (e.g. the classifier) pass a regex such as "
            r'r".*classifier\.modules_to_save\..*", or use a plain optimizer (e.g. optim="adamw_torch") for LoRA alone.'
            if any(getattr(reason, "kind", None) in _PEFT_KINDS for _, reason in resolution.skipped)
            else ""
        )
        raise NoTargetModulesError(
            f"optim_target_modules={targets!r} matched no trainable nn.Linear in {type(model).__name__}.{skipped}"
            f"{ignored} Linear modules of this model include: {examples}. A string is a regex matched against the "
            'whole name; a list entry matches a name exactly, as a substring, or as a regex; "all-linear" selects '
            f"every Linear.{peft_hint}"
        )
    return resolution


def _summarize_skipped(skipped: list[tuple[str, str]], limit: int = 3) -> str:
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")
        parts.append(f"{reason}: {shown}")
    return "; ".join(parts)


def summarize_names(names: Sequence[str]) -> str:
    """Compact description of module names: layer indices folded into `*` with counts (`layers.*.q_proj ×12`)."""
    counts: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"(?<=\.)\d+(?=\.)", "*", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(f"{pattern} ×{count}" if count > 1 else pattern for pattern, count in counts.items())


def log_resolution(resolution: TargetResolution, description: str) -> None:
    """Log the resolved targets once (a single INFO line, plus one WARNING line if anything was skipped)."""
    logger.info(
        "%s: projecting %d weight(s): %s", description, len(resolution.modules), summarize_names(resolution.names)
    )
    if resolution.skipped:
        logger.warning(
            "%s: %d matched module(s) are not projected: %s",
            description,
            len(resolution.skipped),
            _summarize_skipped(resolution.skipped),
        )


# ------------------------------------------------------------------------------------------------------------------
# Parameter grouping: the param groups every method's optimizer is built from
# ------------------------------------------------------------------------------------------------------------------


def group_parameters(
    model: nn.Module,
    projected: list[nn.Parameter],
    weight_decay: float,
    is_no_decay: Callable[[str], bool],
    low_rank_overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """`[projected (low_rank=True), plain decay, plain no-decay]` over the trainable parameters of `model`.

    Projected parameters get `weight_decay`; every other `requires_grad` parameter gets it unless `is_no_decay(name)`.
    Empty groups are dropped. Shared by every method's group builder.
    """
    projected_ids = {id(p) for p in projected}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in projected_ids:
            continue
        (no_decay if is_no_decay(name) else decay).append(param)
    groups = [
        {"params": list(projected), "weight_decay": weight_decay, "low_rank": True, **(low_rank_overrides or {})},
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_param_groups(
    model: nn.Module,
    target_modules: TargetSpec | None,
    weight_decay: float,
    no_decay_names: set[str] | None = None,
    low_rank_overrides: dict[str, Any] | None = None,
    description: str = "hf_galore",
    include_heads: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for a GaLore-family optimizer: projected weights, then plain decay / no-decay parameters.

    Only `requires_grad` parameters are included. Projected weights get `weight_decay`; the others get it unless
    their name is in `no_decay_names` (biases and norms, as the Trainer decides). Empty groups are dropped.
    `include_heads` makes `"all-linear"` select the output head too (transformers' rule for its `galore_*` names).
    """
    resolution = resolve_target_modules(model, target_modules, include_heads=include_heads)
    log_resolution(resolution, description)
    no_decay_names = no_decay_names if no_decay_names is not None else set()
    return group_parameters(model, resolution.weights(), weight_decay, no_decay_names.__contains__, low_rank_overrides)
