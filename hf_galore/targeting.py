"""Which weights get low-rank treatment, with PEFT's `target_modules` semantics.

* a string is a regular expression matched with `re.fullmatch` against each module's qualified name;
* a list matches a module whose name equals an entry or ends with `"." + entry`;
* `"all-linear"` (or `"all_linear"`) selects every `nn.Linear` except the output head / task classifier: any module
  with `lm_head`, `classifier`, `classification_head`, `score`, `qa_outputs` or BERT's `cls` in its dotted name,
  and whatever `get_output_embeddings()` returns.

Only trainable `nn.Linear` weights are targeted. Quantized bitsandbytes Linears and PEFT's LoRA internals are
`nn.Linear` subclasses but are never projected; matched non-Linear modules are collected in `TargetResolution.skipped` and logged in one aggregated line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import NoTargetModulesError

logger = logging.getLogger(__name__)

ALL_LINEAR = ("all-linear", "all_linear")

#: Top-level or trailing module names of task heads that `all-linear` leaves out.
HEAD_NAMES = ("lm_head", "classifier", "classification_head", "score", "qa_outputs", "cls")

_PEFT_INTERNALS = re.compile(r"(^|\.)(lora_[A-Za-z_]+|base_layer|lora_magnitude_vector)(\.|$)")

TargetSpec = str | Sequence[str]


@dataclass
class TargetResolution:
    """Result of resolving `optim_target_modules` against a model.

    Attributes:
        modules: `(qualified name, module)` of every targeted Linear, in model order.
        skipped: `(qualified name, reason)` of matched modules that are not projected.
    """

    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]

    def weights(self) -> list[nn.Parameter]:
        """The targeted weights, each once (a weight shared by two targeted modules must be stepped once)."""
        unique: dict[int, nn.Parameter] = {}
        for _, module in self.modules:
            unique.setdefault(id(module.weight), module.weight)
        return list(unique.values())


def _is_head(name: str, module: nn.Module, output_module: nn.Module | None) -> bool:
    if output_module is not None and module is output_module:
        return True
    return any(part in HEAD_NAMES for part in name.split("."))


_PEFT_REASON = "PEFT adapter internals (LoRA factors are already low-rank)"


def _skip_reason(name: str, module: nn.Module) -> str | None:
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        # A PEFT tuner layer (e.g. `peft.tuners.lora.Linear`) wrapping a frozen base Linear.
        return f"PEFT adapter layer ({type(module).__name__}; its base_layer is frozen, its factors are low-rank)"
    if not isinstance(module, nn.Linear):
        return f"not an nn.Linear ({type(module).__name__})"
    if type(module).__module__.startswith("bitsandbytes"):
        return f"quantized bitsandbytes layer ({type(module).__name__}); its weight is not trainable in full rank"
    if _PEFT_INTERNALS.search(name):
        return _PEFT_REASON
    weight = module.weight
    if not weight.requires_grad:
        return "frozen (requires_grad=False)"
    if not torch.is_floating_point(weight):
        return f"non-floating weight ({weight.dtype})"
    return None


def _matches(name: str, spec: TargetSpec) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _output_module(model: nn.Module) -> nn.Module | None:
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is None:
        return None
    try:
        return get_output()
    except (NotImplementedError, AttributeError):
        return None


def resolve_target_modules(
    model: nn.Module, targets: TargetSpec | None, exclude: Sequence[str] = (), include_heads: bool = False
) -> TargetResolution:
    """Resolve `targets` (as in `TrainingArguments.optim_target_modules`) to the Linear modules to project.

    Args:
        model (`nn.Module`): The model (a PEFT model works too: adapter internals are skipped).
        targets (`str` or `list[str]`): Regex, list of names/suffixes, or `"all-linear"`.
        exclude (`list[str]`, *optional*): Names or dot-suffixes to leave out.
        include_heads (`bool`, defaults to `False`): With `"all-linear"`, also project output heads/classifiers.

    Raises:
        [`NoTargetModulesError`]: when nothing trainable matched; the message lists the given value and a few
            Linear module names that exist.
    """
    if targets is None or (not isinstance(targets, str) and len(targets) == 0):
        raise NoTargetModulesError(
            "GaLore-family optimizers need `optim_target_modules` to know which weights to project, got None. "
            'Pass e.g. optim_target_modules="all-linear", a regex such as r".*(attn|mlp).*", or a list of module '
            'names/suffixes such as ["query", "value"].'
        )
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    output_module = _output_module(model)
    resolution = TargetResolution()
    for name, module in model.named_modules():
        if not name:
            continue
        if all_linear:
            if not isinstance(module, nn.Linear) or (not include_heads and _is_head(name, module, output_module)):
                continue
        elif not _matches(name, targets):
            continue
        if exclude and _matches(name, list(exclude)):
            continue
        reason = _skip_reason(name, module)
        if reason is None:
            resolution.modules.append((name, module))
        elif _PEFT_INTERNALS.search(name) and not isinstance(module, nn.Linear):
            continue  # PEFT's containers (lora_A ModuleDict, dropout, ...): their Linears are reported instead
        elif isinstance(module, nn.Linear) or not all_linear:
            resolution.skipped.append((name, reason))
    if not resolution.modules:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        examples = ", ".join(linear_names[:6]) or "(the model has no nn.Linear)"
        skipped = f" Matched but skipped: {_summarize_skipped(resolution.skipped)}." if resolution.skipped else ""
        # A LoRA PeftModel has no full-size trainable Linear outside `modules_to_save`: say what to do instead.
        peft_hint = (
            " On a PEFT model the LoRA factors are already low-rank and always get the plain inner update; to "
            "project the full-size weights of `modules_to_save` (e.g. the classifier) pass a regex such as "
            r'r".*classifier\.modules_to_save\..*", or use a plain optimizer (e.g. optim="adamw_torch") for LoRA alone.'
            if any(reason.startswith("PEFT adapter") for _, reason in resolution.skipped)
            else ""
        )
        raise NoTargetModulesError(
            f"optim_target_modules={targets!r} matched no trainable nn.Linear in {type(model).__name__}.{skipped} "
            f"Linear modules of this model include: {examples}. A string is a regex matched against the whole "
            'name, a list matches exact names or dot-suffixes; "all-linear" selects every Linear but the head.'
            f"{peft_hint}"
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
