"""WeLore: data-agnostic one-shot low-rank compression and LRC-only fine-tuning (Jaiswal et al., 2024,
arXiv:2407.11239), for any model whose weights are `nn.Linear` layers.

The pipeline, reimplemented from the paper:

1. [`analyze`]: the singular values of every targeted weight (fp32, whatever the model dtype), min–max normalised
   per matrix: `s_n = (s − min s) / (max s − min s)`.
2. One **global** threshold τ prunes, in every matrix, the ranks whose `s_n < τ`. Heavy-tailed spectra lose many
   ranks, flat ones few. τ is **solved by bisection** (over the sorted candidate thresholds, so it is exact) to
   reach the requested compression of the targeted weights, measured in **parameters**.
3. A weight whose rank reduction exceeds `min_reduction` (and whose two rank-k factors hold fewer values than the
   dense matrix) becomes a Low-Rank Component (LRC): a [`LowRankLinear`] with factors `U_k √S_k` and `√S_k V_kᵀ`
   (bias on the output factor, dtype and device of the original). The others are Non-Low-Rank Components
   (N-LRC): dense and frozen.
4. [`compress`] performs that split in place and records the factor ranks in `model.config.quantization_config`
   (`quant_method="hf_galore_welore"`), so `model.save_pretrained` (and `Trainer.save_model`) writes a smaller,
   factorized checkpoint that the stock `AutoModel*.from_pretrained` rebuilds after `import hf_galore` (see
   `hf_galore.loading`; [`from_pretrained`] is a thin wrapper); [`merge`] turns the factors back into dense
   Linears.

Which Linears are considered follows `optim_target_modules` (default `"all-linear"`: every Linear but the output
head / classifier). GPT-2-style `Conv1D` layers are **not supported**: they are listed as skipped and stay dense.

Example:
    ```python
    >>> from hf_galore import welore
    >>> plan = welore.analyze(model, target_compression=0.5)  # no change to the model
    >>> print(plan.summary())
    >>> welore.compress(model, target_compression=0.5)  # in place; only the LRC factors stay trainable
    >>> model.save_pretrained("out")  # factorized checkpoint
    >>> model = AutoModelForSequenceClassification.from_pretrained("out")  # rebuilds the LowRankLinear structure
    >>> dense = welore.merge(model)  # plain Linears again
    ```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ... import loading
from ...errors import InvalidConfigError, NoTargetModulesError, UnsupportedSetupError
from ...modules.low_rank_linear import LowRankLinear
from ...projection.spectrum import is_lrc, kept_ranks, normalize_spectrum, params_at, singular_values
from ...targeting import (
    ALL_LINEAR,
    SkipKind,
    SkipReason,
    TargetSpec,
    is_head,
    matches_target,
    output_module,
    resolve_target_modules,
    summarize_names,
)
from .config import WeLoreConfig

logger = logging.getLogger(__name__)

#: `quantization_config.quant_method` of a WeLore-factorized model (the record of its factor ranks).
QUANT_METHOD = "hf_galore_welore"
#: `config.json` key of the record before it moved into `quantization_config` (still read by the loader).
LEGACY_CONFIG_KEY = "welore"
FORMAT_VERSION = loading.FORMAT_VERSION
#: Optimizer names whose model preparation is the WeLore split.
WELORE_OPTIMIZERS = ("welore_adamw", "welore_adamw_8bit")
#: Fields of [`WeLoreConfig`] that decide what trains (as opposed to how much is compressed).
TRAINABLE_FLAGS = ("train_norms", "train_biases", "train_embeddings", "train_heads")
_CONV1D_REASON = (
    "GPT-2-style Conv1D (weight stored in×out) is not supported by WeLore; it stays dense and frozen. "
    "Convert the model to nn.Linear layers to compress it"
)


# ------------------------------------------------------------------------------------------------------------------
# Spectra and the threshold solver (pure tensor math)
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class MatrixPlan:
    """The WeLore decision for one weight matrix.

    Attributes:
        name: Qualified module name.
        shape: `(out_features, in_features)`.
        kept_rank: Rank k kept by the threshold (meaningful for LRCs; N-LRCs stay full rank).
        lrc: Whether it becomes a trainable Low-Rank Component.
        has_bias: Whether the Linear has a bias (kept on the output factor).
        top_singular_value: Largest singular value (fp32).
        stable_rank: ‖W‖²_F / ‖W‖²₂, a scale-free measure of how low-rank the spectrum is.
    """

    name: str
    shape: tuple[int, int]
    kept_rank: int
    lrc: bool
    has_bias: bool = False
    top_singular_value: float = 0.0
    stable_rank: float = 0.0

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def pruned(self) -> int:
        return self.full_rank - self.kept_rank

    @property
    def reduction(self) -> float:
        """Rank reduction ratio `pruned / min(m, n)` at the solved threshold."""
        return self.pruned / self.full_rank

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params_after(self) -> int:
        """Weight entries after the split: `k(m + n)` for an LRC, `m·n` for an N-LRC (biases excluded)."""
        return self.kept_rank * (self.shape[0] + self.shape[1]) if self.lrc else self.dense_params


@dataclass
class WeLorePlan:
    """The LRC/N-LRC split WeLore makes for a model, with its parameter and memory accounting.

    Attributes:
        threshold: The solved global threshold τ on the normalised singular values.
        target_compression: Requested fraction of the targeted weights' parameters to remove.
        min_reduction: Rank-reduction ratio above which a weight may become an LRC.
        matrices: One [`MatrixPlan`] per targeted weight, in model order.
        skipped: `(module name, reason)` of modules that stay dense (e.g. Conv1D).
        model_params: Parameters of the whole model before the split (tied weights counted once).
        bytes_per_param: Bytes per element of the targeted weights (2 for bf16, 4 for fp32).
    """

    threshold: float
    target_compression: float
    min_reduction: float
    matrices: list[MatrixPlan]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_params: int = 0
    bytes_per_param: int = 4

    # -------------------------------------------------------------------------------------------- accounting
    @property
    def ranks(self) -> dict[str, int]:
        """`{module name: kept rank}` of the LRCs (what the checkpoint's config records)."""
        return {m.name: m.kept_rank for m in self.matrices if m.lrc}

    @property
    def lrc_names(self) -> list[str]:
        return [m.name for m in self.matrices if m.lrc]

    @property
    def n_lrc_names(self) -> list[str]:
        return [m.name for m in self.matrices if not m.lrc]

    @property
    def dense_params(self) -> int:
        """Weight entries of the targeted matrices before the split."""
        return sum(m.dense_params for m in self.matrices)

    @property
    def params_after(self) -> int:
        """Weight entries of the targeted matrices after the split."""
        return sum(m.params_after for m in self.matrices)

    @property
    def compression(self) -> float:
        """Achieved fraction of the targeted weights' parameters removed (what the solver targets)."""
        return 1.0 - self.params_after / self.dense_params

    @property
    def model_params_after(self) -> int:
        return self.model_params - (self.dense_params - self.params_after)

    @property
    def model_compression(self) -> float:
        """Fraction of the whole model's parameters removed; the factorized checkpoint shrinks by this much."""
        return 1.0 - self.model_params_after / self.model_params if self.model_params else 0.0

    @property
    def rank_reduction(self) -> float:
        """The paper's rank view: ranks removed from LRCs / all ranks of the targeted matrices."""
        return sum(m.pruned for m in self.matrices if m.lrc) / sum(m.full_rank for m in self.matrices)

    @property
    def attempted_rank_reduction(self) -> float:
        """Ranks under the threshold in all targeted matrices (LRC or not) / all ranks."""
        return sum(m.pruned for m in self.matrices) / sum(m.full_rank for m in self.matrices)

    @property
    def lrc_params(self) -> int:
        """Factor entries of the LRCs: the parameters `welore_adamw` trains by default."""
        return sum(m.params_after for m in self.matrices if m.lrc)

    def memory(self) -> dict[str, int]:
        """Training memory in bytes: full fine-tuning with AdamW vs LRC-only WeLore fine-tuning.

        Counts weights and gradients at the model's precision plus AdamW's two fp32 moments, for every parameter
        (full fine-tuning) or only for the LRC factors (WeLore; opted-in norms/biases/heads add their own share).
        Activations are not included: they depend on the batch, not on the method.
        """
        b = self.bytes_per_param
        full = self.model_params * (b + b + 8)
        welore = self.model_params_after * b + self.lrc_params * (b + 8)
        return {
            "weights_before": self.model_params * b,
            "weights_after": self.model_params_after * b,
            "full_finetune": full,
            "welore_finetune": welore,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary with every matrix's decision."""
        return {
            "threshold": self.threshold,
            "target_compression": self.target_compression,
            "min_reduction": self.min_reduction,
            "compression": self.compression,
            "model_compression": self.model_compression,
            "rank_reduction": self.rank_reduction,
            "attempted_rank_reduction": self.attempted_rank_reduction,
            "dense_params": self.dense_params,
            "params_after": self.params_after,
            "model_params": self.model_params,
            "model_params_after": self.model_params_after,
            "lrc_params": self.lrc_params,
            "memory_bytes": self.memory(),
            "matrices": [
                {**dataclasses.asdict(m), "reduction": m.reduction, "params_after": m.params_after}
                for m in self.matrices
            ],
            "skipped": [list(s) for s in self.skipped],
        }

    def summary(self) -> str:
        """A few lines: threshold, parameter and rank views, LRC/N-LRC counts, checkpoint and memory savings."""
        mem = self.memory()
        mib = 2**20
        lines = [
            f"WeLore threshold τ = {self.threshold:.6f} (target_compression={self.target_compression}, "
            f"min_reduction={self.min_reduction})",
            f"Targeted weights: {len(self.matrices)} matrices, {self.dense_params:,} → {self.params_after:,} "
            f"parameters ({self.compression:.2%} removed)",
            f"Rank view: {self.rank_reduction:.2%} of ranks removed in LRCs "
            f"({self.attempted_rank_reduction:.2%} under the threshold in all matrices)",
            f"LRC (trainable, factorized): {len(self.lrc_names)}"
            + (f": {summarize_names(self.lrc_names)}" if self.lrc_names else ""),
            f"N-LRC (dense, frozen): {len(self.n_lrc_names)}"
            + (f": {summarize_names(self.n_lrc_names)}" if self.n_lrc_names else ""),
            f"Whole model: {self.model_params:,} → {self.model_params_after:,} parameters "
            f"({self.model_compression:.2%} smaller checkpoint); trainable LRC factors: {self.lrc_params:,}",
            f"Training memory (weights + grads + AdamW states, no activations): full fine-tuning "
            f"{mem['full_finetune'] / mib:,.1f} MiB → WeLore {mem['welore_finetune'] / mib:,.1f} MiB",
        ]
        if self.skipped:
            lines.append(f"Skipped (stay dense): {len(self.skipped)}: {summarize_names([n for n, _ in self.skipped])}")
        return "\n".join(lines)


def solve_threshold(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    target_compression: float,
    min_reduction: float = 0.5,
) -> tuple[float, dict[str, int]]:
    """Solve the global threshold τ that removes `target_compression` of the matrices' parameters.

    The parameter count is a step function of τ that only changes at the normalised singular values, so the
    bisection runs over those sorted candidate values: about log₂(#singular values) evaluations, and the result is
    the candidate whose compression is closest to the target (on a tie, the one that reaches it). When even τ = 1
    (every matrix at rank 1 where that saves parameters) cannot reach the target, the most compressing τ is returned
    with a warning.

    Args:
        spectra (`Mapping[str, Tensor]`): Singular values of each matrix (any order; they are normalised here).
        shapes (`Mapping[str, tuple[int, int]]`): `(out, in)` of each matrix, same keys.
        target_compression (`float`): Fraction of the parameters to remove, in (0, 1).
        min_reduction (`float`, defaults to 0.5): Rank reduction above which a matrix may be factorized.

    Returns:
        `tuple[float, dict[str, int]]`: τ and the kept rank of every matrix at τ.

    Raises:
        [`InvalidConfigError`]: on an out-of-range argument or mismatched keys.
    """
    WeLoreConfig(target_compression=target_compression, min_reduction=min_reduction)  # range checks
    if not spectra:
        raise InvalidConfigError("solve_threshold got no matrices; pass at least one spectrum.")
    if set(spectra) != set(shapes):
        raise InvalidConfigError(
            f"spectra and shapes must have the same keys; got {sorted(spectra)} and {sorted(shapes)}."
        )
    names = list(spectra)
    shape_list = [tuple(shapes[n]) for n in names]
    ascending = [torch.sort(normalize_spectrum(spectra[n]))[0] for n in names]
    dense = sum(s[0] * s[1] for s in shape_list)

    def compression(tau: float) -> float:
        return 1.0 - params_at(shape_list, kept_ranks(ascending, tau), min_reduction) / dense

    candidates = torch.unique(torch.cat(ascending)).tolist()  # sorted; includes 0 (nothing pruned) and 1
    lo, hi = 0, len(candidates) - 1
    if compression(candidates[hi]) < target_compression:
        best = candidates[hi]
        logger.warning(
            "WeLore: target_compression=%s is out of reach: the most a global threshold can remove with "
            "min_reduction=%s is %.2f%% of the targeted parameters. Using that; lower target_compression or "
            "min_reduction to get an exact match.",
            target_compression,
            min_reduction,
            100 * compression(best),
        )
    else:
        while lo < hi:  # smallest index whose compression reaches the target
            mid = (lo + hi) // 2
            if compression(candidates[mid]) >= target_compression:
                hi = mid
            else:
                lo = mid + 1
        best = candidates[lo]
        if lo > 0 and target_compression - compression(candidates[lo - 1]) < compression(best) - target_compression:
            best = candidates[lo - 1]
    kept = kept_ranks(ascending, best)
    return float(best), dict(zip(names, kept, strict=True))


# ------------------------------------------------------------------------------------------------------------------
# Model-level analysis, split, trainable set
# ------------------------------------------------------------------------------------------------------------------


def resolve_config(config: WeLoreConfig | Mapping[str, Any] | str | None, **overrides: Any) -> WeLoreConfig:
    if config is None:
        config = WeLoreConfig()
    elif isinstance(config, str):
        from ...configs import parse_optim_args

        config = parse_optim_args(config, (WeLoreConfig,), "welore")[0]
    elif isinstance(config, Mapping):
        config = WeLoreConfig.from_dict(dict(config))
    elif not isinstance(config, WeLoreConfig):
        raise InvalidConfigError(
            f"config must be a WeLoreConfig, a dict or an optim_args string, got {type(config).__name__}."
        )
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config


def is_compressed(model: nn.Module) -> bool:
    """Whether `model` already went through the WeLore split (it holds [`LowRankLinear`]s or a record)."""
    return _record(model) is not None or any(isinstance(m, LowRankLinear) for m in model.modules())


def _record(model: nn.Module) -> dict[str, Any] | None:
    """A copy of the WeLore record (factor ranks, τ, `train_*` flags) of `model`, or None."""
    return loading.get_record(model, QUANT_METHOD)


def _set_record(model: nn.Module, record: dict[str, Any] | None) -> None:
    loading.set_record(model, QUANT_METHOD, record)


def _conv1d_skips(model: nn.Module, targets: TargetSpec) -> list[tuple[str, str]]:
    """GPT-2-style Conv1D modules the targets select (all of them for all-linear), listed as skipped."""
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    output = output_module(model)
    skipped = []
    for name, module in model.named_modules():
        if type(module).__name__ != "Conv1D" or is_head(name, module, output):
            continue
        if all_linear or matches_target(name, targets):
            skipped.append((name, SkipReason(_CONV1D_REASON, SkipKind.NOT_LINEAR, "Conv1D")))
    return skipped


def _targets(model: nn.Module, target_modules: TargetSpec | None) -> tuple[list[tuple[str, nn.Linear]], list]:
    targets = "all-linear" if target_modules is None else target_modules
    conv = _conv1d_skips(model, targets)
    try:
        resolution = resolve_target_modules(model, targets)
    except NoTargetModulesError as exc:
        hint = (
            f" This model's {len(conv)} Conv1D layer(s) ({summarize_names([n for n, _ in conv])}) are not supported by "
            "WeLore."
            if conv
            else ""
        )
        raise NoTargetModulesError(f"WeLore found no weight to compress: {exc}{hint}") from None
    # Conv1D modules are reported once, with WeLore's own reason (from `_conv1d_skips`), not as "not an nn.Linear".
    conv1d = (SkipKind.NOT_LINEAR, "Conv1D")
    skipped = [
        s for s in resolution.skipped if (getattr(s[1], "kind", None), getattr(s[1], "module_type", "")) != conv1d
    ] + conv
    return list(resolution.modules), skipped


def _unique_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def analyze(
    model: nn.Module,
    config: WeLoreConfig | Mapping[str, Any] | str | None = None,
    target_modules: TargetSpec | None = "all-linear",
    **overrides: Any,
) -> WeLorePlan:
    """The LRC/N-LRC split WeLore would make, without changing the model.

    Args:
        model (`nn.Module`): Any model with `nn.Linear` weights (a `PreTrainedModel` or plain module).
        config ([`WeLoreConfig`], `dict` or `str`, *optional*): `target_compression` / `min_reduction` (an
            `optim_args`-style string works too). Defaults to `WeLoreConfig()`.
        target_modules (`str` or `list[str]`, defaults to `"all-linear"`): Same rules as `optim_target_modules`.
        **overrides: Field overrides, e.g. `target_compression=0.3`.

    Returns:
        [`WeLorePlan`]: Per-matrix decisions, solved threshold, parameter/rank/memory accounting.

    Raises:
        [`NoTargetModulesError`]: when no eligible Linear is found (Conv1D layers are named in the message).
        [`InvalidConfigError`]: on an out-of-range setting.
    """
    config = resolve_config(config, **overrides)
    modules, skipped = _targets(model, target_modules)
    spectra, shapes, extras = {}, {}, {}
    for name, module in modules:
        s = singular_values(module.weight)
        spectra[name] = s
        shapes[name] = tuple(module.weight.shape)
        top = float(s[0]) if s.numel() else 0.0
        stable = float((s.square().sum() / s[0].square()).item()) if top > 0 else 0.0
        extras[name] = (module.bias is not None, top, stable)
    tau, kept = solve_threshold(spectra, shapes, config.target_compression, config.min_reduction)
    matrices = [
        MatrixPlan(
            name=name,
            shape=shapes[name],
            kept_rank=kept[name],
            lrc=is_lrc(shapes[name], kept[name], config.min_reduction),
            has_bias=extras[name][0],
            top_singular_value=extras[name][1],
            stable_rank=extras[name][2],
        )
        for name, _ in modules
    ]
    plan = WeLorePlan(
        threshold=tau,
        target_compression=config.target_compression,
        min_reduction=config.min_reduction,
        matrices=matrices,
        skipped=skipped,
        model_params=_unique_param_count(model),
        bytes_per_param=modules[0][1].weight.element_size(),
    )
    if abs(plan.compression - config.target_compression) > 0.01:
        logger.warning(
            "WeLore: the closest a global threshold gets to target_compression=%s on this model is %.2f%%.",
            config.target_compression,
            100 * plan.compression,
        )
    return plan


def _factorize(model: nn.Module, ranks: Mapping[str, int], from_weights: bool) -> None:
    """Swap each named Linear for a [`LowRankLinear`] of the given rank (SVD of its weight, or empty shapes)."""
    for name, rank in ranks.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise InvalidConfigError(
                f"The WeLore record names module {name!r}, which {type(model).__name__} does not have. The checkpoint "
                "was made from another architecture; pass the matching model_class."
            ) from None
        if not isinstance(linear, nn.Linear):
            raise InvalidConfigError(
                f"WeLore can only factorize nn.Linear, but {name!r} is a {type(linear).__name__}."
            )
        if from_weights:
            low = LowRankLinear.from_linear(linear, rank)
        else:
            w = linear.weight
            low = LowRankLinear(
                linear.in_features, linear.out_features, rank, linear.bias is not None, device=w.device, dtype=w.dtype
            )
        loading.set_submodule(model, name, low)


def trainable_parameter_names(model: nn.Module, config: WeLoreConfig) -> set[str]:
    """Names of the parameters WeLore fine-tuning trains: LRC factors, plus what the `train_*` flags add.

    A tied parameter (e.g. GPT-2's `lm_head` = `wte`) trains if any of its roles is enabled.
    """
    output = output_module(model)
    enabled: set[int] = set()
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if isinstance(module, LowRankLinear):
            enabled |= {id(module.up.weight), id(module.down.weight)}
        if not own:
            continue
        if name and is_head(name, module, output):
            if config.train_heads:
                enabled |= {id(p) for _, p in own}
            continue
        if isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__:
            if config.train_embeddings:
                enabled |= {id(p) for _, p in own}
            continue
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__:
            if config.train_norms:
                enabled |= {id(p) for _, p in own}
            continue
        if config.train_biases:
            enabled |= {id(p) for n, p in own if n == "bias"}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in enabled}


def apply_trainable(model: nn.Module, config: WeLoreConfig | None = None) -> int:
    """Set `requires_grad` for WeLore fine-tuning: only the names of [`trainable_parameter_names`] train.

    Returns:
        `int`: The number of trainable parameters (tied tensors counted once).

    Raises:
        [`InvalidConfigError`]: when nothing would be trainable (no LRC and no `train_*` flag that matches).
    """
    config = config or WeLoreConfig()
    names = _require_trainable(model, config)
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad_(name in names)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _require_trainable(model: nn.Module, config: WeLoreConfig) -> set[str]:
    """[`trainable_parameter_names`], or [`InvalidConfigError`] when it is empty (checked before changing anything)."""
    names = trainable_parameter_names(model, config)
    if not any(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n in names):
        raise InvalidConfigError(
            "After the WeLore split nothing is trainable: no weight became an LRC (min_reduction="
            f"{config.min_reduction}, target_compression={config.target_compression}) and no train_* flag is set. "
            "Lower min_reduction (e.g. min_reduction=0.5), raise target_compression, or set train_norms/"
            "train_biases/train_heads=true."
        )
    return names


def compress(
    model: nn.Module,
    config: WeLoreConfig | Mapping[str, Any] | str | None = None,
    target_modules: TargetSpec | None = "all-linear",
    plan: WeLorePlan | None = None,
    **overrides: Any,
) -> WeLorePlan:
    """Split `model` in place: LRCs become trainable [`LowRankLinear`]s, N-LRCs stay dense and frozen.

    Records the factor ranks (and the `train_*` flags) in `model.config.welore`, so `save_pretrained` writes a
    factorized checkpoint that [`from_pretrained`] rebuilds. Then sets `requires_grad` with [`apply_trainable`].

    Args:
        model (`nn.Module`): The model (not yet compressed).
        config ([`WeLoreConfig`], `dict` or `str`, *optional*): Compression and trainable-set settings.
        target_modules (`str` or `list[str]`, defaults to `"all-linear"`): Same rules as `optim_target_modules`.
        plan ([`WeLorePlan`], *optional*): A plan from [`analyze`] on this model, to skip the analysis.
        **overrides: Field overrides of `config`.

    Returns:
        [`WeLorePlan`]: The split that was applied.

    Raises:
        [`UnsupportedSetupError`]: when the model is already compressed (WeLore is one-shot).
        [`NoTargetModulesError`], [`InvalidConfigError`]: see [`analyze`] and [`apply_trainable`].
    """
    config = resolve_config(config, **overrides)
    if is_compressed(model):
        raise UnsupportedSetupError(
            f"{type(model).__name__} is already WeLore-compressed (it holds LowRankLinear layers); the split is "
            "one-shot. Train it as is, or hf_galore.welore.merge() it first to compress a dense model again."
        )
    loading.check_can_record(model, QUANT_METHOD)
    plan = plan or analyze(model, config, target_modules)
    if not plan.ranks:
        # No LRC: the split changes no module, so the trainable set is known now; refuse before touching the model.
        _require_trainable(model, config)
    _factorize(model, plan.ranks, from_weights=True)
    record = {
        "format_version": FORMAT_VERSION,
        "ranks": plan.ranks,
        "threshold": plan.threshold,
        "target_compression": plan.target_compression,
        "min_reduction": plan.min_reduction,
        "compression": plan.compression,
        "model_compression": plan.model_compression,
        **{flag: getattr(config, flag) for flag in TRAINABLE_FLAGS},
    }
    _set_record(model, record)
    if not plan.ranks:
        logger.warning(
            "WeLore: no weight became an LRC (min_reduction=%s); every targeted weight is N-LRC (dense, frozen).",
            config.min_reduction,
        )
    trainable = apply_trainable(model, config)
    logger.info(
        "WeLore split: %d LRC, %d N-LRC, %.2f%% of targeted parameters removed (τ=%.5f); %d trainable parameters.",
        len(plan.lrc_names),
        len(plan.n_lrc_names),
        100 * plan.compression,
        plan.threshold,
        trainable,
    )
    return plan


def merge(model: nn.Module, dtype: torch.dtype | None = None, *, inplace: bool = True) -> nn.Module:
    """Replace every [`LowRankLinear`] by a dense `nn.Linear` with weight `up.weight @ down.weight` (fp32 product).

    The WeLore record is removed from the config and every parameter is made trainable again, so the result is a
    plain model that `save_pretrained` / `AutoModel.from_pretrained` handle without hf_galore. Same name and
    arguments as `hf_galore.q_galore.merge`.

    Args:
        model (`nn.Module`): A WeLore-compressed model.
        dtype (`torch.dtype`, *optional*): dtype of the merged weights (default: the factors' dtype).
        inplace (`bool`, defaults to `True`): Modify `model` itself; `False` merges a deep copy.

    Returns:
        `nn.Module`: The dense model.
    """
    if isinstance(dtype, bool):  # the former signature merge(model, inplace)
        warnings.warn(
            "hf_galore.welore.merge(model, inplace) is now merge(model, dtype=None, *, inplace=True); pass "
            "inplace= by keyword.",
            FutureWarning,
            stacklevel=2,
        )
        dtype, inplace = None, dtype
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    names = [name for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    for name in names:
        linear = model.get_submodule(name).to_linear()
        loading.set_submodule(model, name, linear.to(dtype) if dtype is not None else linear)
    _set_record(model, None)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------------------------------------
# Factorized checkpoints
# ------------------------------------------------------------------------------------------------------------------


def _finish(model: nn.Module, record: dict[str, Any]) -> None:
    """After loading: re-apply the recorded trainable set (LRC factors plus the opted-in tensors)."""
    flags = {k: v for k, v in record.items() if k in {f.name for f in dataclasses.fields(WeLoreConfig)}}
    apply_trainable(model, WeLoreConfig(**flags))


loading.register_format(
    loading.ModelFormat(
        quant_method=QUANT_METHOD,
        name="WeLore",
        module_names=lambda record: list(record["ranks"]),
        build=lambda model, record: _factorize(model, record["ranks"], from_weights=False),
        finish=_finish,
        merge=lambda model: merge(model),
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
    """Load a factorized WeLore checkpoint written by `save_pretrained` / `Trainer.save_model` (in eval mode).

    A thin wrapper of the stock `from_pretrained`, which itself rebuilds the [`LowRankLinear`] structure after
    `import hf_galore` (see `hf_galore.loading`): it checks the checkpoint is a WeLore one, with a clear error
    otherwise, defaults the class to `config.architectures[0]`, and the dtype to the checkpoint's. The recorded
    trainable set is re-applied. Same arguments, in the same order, as `hf_galore.q_galore.from_pretrained`.

    Args:
        path (`str`): Directory holding `config.json` (with a WeLore `quantization_config`) and the weights.
        model_class (`type`, *optional*): The model class; defaults to `config.architectures[0]` in `transformers`.
            (Formerly `model_cls`, still accepted with a `FutureWarning`.)
        dtype (`torch.dtype` or `str`, *optional*): Dtype to load the model in; defaults to the checkpoint's.
        device (`torch.device` or `str`, *optional*): Device to move the model to after loading.
        **kwargs: Passed to `from_pretrained` (e.g. `device_map`).

    Returns:
        `PreTrainedModel`: The factorized model, in eval mode.

    Raises:
        [`InvalidConfigError`]: when the checkpoint is not a WeLore checkpoint or does not match `model_class`.
    """
    model_class = loading.renamed_argument(kwargs, "model_cls", "model_class", model_class, "welore.from_pretrained")
    kwargs["dtype"] = dtype if dtype is not None else "auto"
    model = loading.from_pretrained(path, QUANT_METHOD, model_class, **kwargs)
    return model.to(device) if device is not None else model


# ------------------------------------------------------------------------------------------------------------------
# Trainer integration: the registry's prepare_model / build_groups hooks and the callback's entry point
# ------------------------------------------------------------------------------------------------------------------


def prepare_for_training(
    model: nn.Module, config: WeLoreConfig | None = None, target_modules: TargetSpec | None = None
) -> WeLorePlan | None:
    """Split `model` for WeLore fine-tuning unless that already happened (then only the trainable set is applied).

    Used by both entry points, so `WeLoreCallback` + `optim="welore_adamw"` splits exactly once:

    * not compressed yet → [`compress`] with `config` and `target_modules` (default `"all-linear"`);
    * already compressed (by the callback, [`compress`] or [`from_pretrained`]) → the recorded `train_*` flags are
      re-applied, unless `config` differs from the defaults, in which case its `train_*` flags win; compression
      settings that differ from the recorded ones are ignored with a warning.

    Returns:
        [`WeLorePlan`] when it split the model, else `None`.
    """
    config = config or WeLoreConfig()
    if not is_compressed(model):
        return compress(model, config, target_modules)
    record = _record(model) or {}
    if config == WeLoreConfig():
        flags = {flag: record.get(flag, getattr(config, flag)) for flag in TRAINABLE_FLAGS}
        config = dataclasses.replace(config, **flags)
    else:
        for key in ("target_compression", "min_reduction"):
            if key in record and record[key] != getattr(config, key):
                logger.warning(
                    "WeLore: the model is already compressed with %s=%s; the requested %s=%s is ignored (the split "
                    "is one-shot).",
                    key,
                    record[key],
                    key,
                    getattr(config, key),
                )
        if record:
            record.update({flag: getattr(config, flag) for flag in TRAINABLE_FLAGS})
            _set_record(model, record)
    apply_trainable(model, config)
    return None
