"""The low-rank step skeleton shared by every GaLore-family optimizer.

For each parameter of a `low_rank=True` group (a 2-D weight):

1. refresh the basis when due (every `update_proj_gap` steps, optionally staggered), in fp32;
2. project the gradient onto it (r×n or m×r);
3. run the inner optimizer (Adam, 8-bit Adam, Adafactor) on the small tensor;
4. project the update back, scale it by α and add it to the weight in one `addmm_`, after decoupled weight decay.

Every other parameter gets the plain inner update. Subclasses implement only the inner optimizer
(`_init_inner_state`, `_plain_update`, `_low_rank_update`).

FSDP2 (`fully_shard`) parameters, DTensors with one `Shard(0)` placement, are stepped on their local rows by the
classes that declare `supports_row_sharding` (GaLore's and WeLore's AdamW, GaLoreAdafactor, FloraAdamW,
FloraAdafactor; others refuse them): projected on the right side, whose basis is replicated, so an ordinary step
needs no collective but a one-number non-finite check per weight; a refresh all-reduces n×(rank+oversample)
sketches (`sharded_right_basis`). Non-projected parameters (all of WeLore's) get the elementwise update on their
rows, with no collective. The Adafactor engine also all-reduces its few global means and RMS per step (see
`optim/adafactor.py`). See docs/how_to/fsdp2.md.

Optimizer state is data: per parameter `step`, `side`, `seed`, `refresh_count`, `refresh_offset` (Python ints) and
tensors (`proj_left` m×r, `proj_right` n×r, the inner moments), all in `self.state`, so `state_dict()` loads with
`torch.load(weights_only=True)` and a resumed run continues bit for bit. For a row-sharded parameter `state_dict()`
gives the row-following states as `Shard(0)` DTensors of the global shape and `load_state_dict` takes this process'
rows of whatever arrives, so `torch.distributed.checkpoint` reshards the state to any number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any, ClassVar, Protocol

import torch
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from ..configs import check_number
from ..errors import InvalidConfigError, UnsupportedSetupError
from ..projection.quant import dequantize_packed, num_groups, quantize_packed
from ..projection.subspace import (
    Side,
    add_projected_back_,
    align_signs,
    choose_side,
    compute_bases,
    low_rank_shape,
    project,
    row_sharded_side,
    sharded_right_basis,
)
from ..utils.deprecation import moved_attributes
from ._hooks import check_unhooked
from ._sharding import RowSharding, all_reduce, is_dtensor, local_tensor, row_dtensor, row_sharding, rows_of

#: Basis dtypes as plain ints (state holds tensors and numbers only), and the two basis sides.
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SIDES = ("left", "right")
#: State keys of a quantized basis of one side.
_PACKED_KEYS = ("q", "scales", "zeros", "rows", "cols")

#: Every subclass of `LowRankOptimizer` by class name: who wrote a state signature's `kind`.
_CLASSES_BY_NAME: dict[str, type] = {}

#: Keys that other code (LR schedulers, our integrations) may add to a group.
_FOREIGN_GROUP_KEYS = {"params", "initial_lr", "name"}

#: Version of the state layout that `state_dict()` writes (bump it when a state key changes meaning).
STATE_FORMAT = 1
#: Top-level key of `state_dict()` holding its signature: `{"kind": optimizer class, "format": STATE_FORMAT}`.
SIGNATURE_KEY = "hf_galore"
#: Group keys restored from the checkpoint as `torch.optim` does: the LR scheduler drives `lr` and `initial_lr`.
_RESTORED_GROUP_KEYS = {"lr"} | _FOREIGN_GROUP_KEYS
#: Group keys of projected groups that the saved per-weight state depends on (shapes, stored seeds, stagger
#: offsets, Q-GaLore's similarity queue): a checkpoint saved with other values cannot be converted. `proj_type` is
#: not one: what the state depends on is each weight's side, which `proj_type` decides together with the setup (under
#: FSDP2 `std` means right), so `load_state_dict` compares the saved side of each weight instead.
_LAYOUT_KEYS = ("rank", "seed", "stagger", "queue_size")

#: Valid ranges of the float hyperparameters that no config dataclass holds, checked wherever a key is present:
#: `(low, high, low_open, high_open, allow_none)`. A NaN or an infinity is never valid. `lr` and `weight_decay` come
#: from the Trainer's arguments, `betas`/`eps` are the engines' own (see `engine_defaults`); every other knob is
#: checked by its config's `__post_init__` (see `LowRankOptimizer.inner_configs`).
_FLOAT_RANGES: dict[str, tuple[float, float, bool, bool, bool]] = {
    "lr": (0.0, math.inf, False, True, True),  # None: Adafactor's relative step
    "weight_decay": (0.0, math.inf, False, True, False),
    "betas": (0.0, 1.0, False, True, False),
    "eps": (0.0, math.inf, False, True, False),
}


def check_float_hyperparameters(hp: dict[str, Any]) -> None:
    """Check the float hyperparameters of `hp` that [`_FLOAT_RANGES`] knows (`betas`/`eps` may be tuples).

    Raises:
        [`InvalidConfigError`]: naming the key, the value and the valid range.
    """
    for key, (low, high, low_open, high_open, allow_none) in _FLOAT_RANGES.items():
        if key not in hp:
            continue
        value = hp[key]
        values = value if isinstance(value, (tuple, list)) else (value,)
        if key == "betas" and len(values) != 2:
            raise InvalidConfigError(f"betas={value!r} is not valid: it must be a pair (beta1, beta2).")
        for i, item in enumerate(values):
            label = f"{key}[{i}]" if isinstance(value, (tuple, list)) else key
            check_number(label, item, low, high, low_open=low_open, high_open=high_open, allow_none=allow_none)


@dataclasses.dataclass(frozen=True)
class ParamBytes:
    """What one parameter costs an optimizer, in bytes: the storage rules the memory estimator sums.

    Reported by [`LowRankOptimizer.param_bytes`] from a shape and the group's settings, without a tensor, by the
    class that allocates the storage, so the rule lives next to the code it describes.

    Attributes:
        weights: The parameter as the model stores it (Q-GaLore: INT8 codes + scales/zeros + the carrier).
        states: Tensors in `optimizer.state` other than the bases (moments, Q-GaLore's leading vectors and queue).
        bases: Projection bases (P and/or Q, packed when quantized).
        projected: Whether the update runs in a compressed space (min(m, n) > rank).
        prepared: The gradient handed to the update (projected for GaLore, full for FLoRA), gradient dtype; the
            layer-wise hooks hold it until `step()` when clipping.
        accumulator: The layer-wise gradient-accumulation buffer of a projected weight.
        refresh: Transient workspace of one basis refresh / projection resampling of this parameter.
        update_elements: Elements updated at once for this parameter (the step workspace scales with it).
    """

    weights: int
    states: int
    bases: int = 0
    projected: bool = False
    prepared: int = 0
    accumulator: int = 0
    refresh: int = 0
    update_elements: int = 0


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()


class ApplyBack(Protocol):
    """Called by the inner optimizer: weight ← beta · weight + alpha · scale · project_back(update), in one pass over
    the weight (`beta` < 1 carries a decoupled weight decay)."""

    def __call__(self, update: torch.Tensor, alpha: float, beta: float = 1.0) -> None: ...


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit mix of integers (the same on every process and platform)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**64 - 1)
    return value % (2**63)


class LowRankOptimizer(Optimizer):
    """Base class of the GaLore-family optimizers: refresh, project, inner update, project back, apply.

    Args:
        params (`Iterable`):
            Parameters or param groups. Groups with `low_rank=True` hold 2-D weights to project; a group that sets
            `rank` is such a group unless it says `low_rank=False` (galore-torch's param-group API). Any key of
            `low_rank_config` (GaLore's: `rank`, `update_proj_gap`, `scale`, `proj_type`, `svd`, `power_iters`,
            `oversample`, `stagger`, `seed`, ...) can be overridden per group. Unknown group keys raise [`InvalidConfigError`].
        lr (`float`): Learning rate.
        weight_decay (`float`): Decoupled weight decay, applied to the full weight.
        **kwargs: The projection knobs (`low_rank_config`, e.g. [`GaLoreConfig`]) and the inner engine's knobs
            (`inner_configs`, `engine_defaults`).
    """

    #: Config dataclasses of the inner engine's knobs (e.g. `MultiTensorConfig`, `AdafactorConfig`): the only source
    #: of their defaults and ranges. A later class overrides the defaults of an earlier one's fields.
    inner_configs: ClassVar[tuple[type, ...]] = ()

    #: Inner hyperparameters that no config holds, with their defaults: Adam's `betas`/`eps` and Adafactor's `eps`,
    #: which the Trainer fills from its own arguments (`adam_beta1/2`, `adam_epsilon`) rather than from `optim_args`.
    engine_defaults: ClassVar[dict[str, Any]] = {}

    #: Every inner hyperparameter with its default: `engine_defaults` plus the fields of `inner_configs`, derived
    #: when a class declaring either is created (see `__init_subclass__`). Do not write it by hand.
    inner_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _derive_inner_defaults(cls) -> dict[str, Any]:
        defaults = dict(cls.engine_defaults)
        for config in cls.inner_configs:
            defaults.update({f.name: f.default for f in dataclasses.fields(config)})
        return defaults

    #: The config dataclass of the projection knobs (valid as optimizer kwargs and per-group overrides): the only
    #: source of their defaults and ranges. Set by each method's optimizer declaration (e.g. `GaLoreConfig`).
    low_rank_config: ClassVar[type | None] = None

    @classmethod
    def low_rank_defaults(cls) -> dict[str, Any]:
        """`{"low_rank": False}` plus every field of `low_rank_config` with its default."""
        if cls.low_rank_config is None:  # projects nothing (e.g. WeLore's AdamW)
            return {"low_rank": False}
        fields = dataclasses.fields(cls.low_rank_config)
        return {"low_rank": False, **{f.name: f.default for f in fields}}

    #: Whether this optimizer steps on FSDP2's row-sharded DTensor parameters (see `_check_sharded_params`). Only
    #: classes whose every code path was checked on local shards say True; the others refuse DTensor parameters.
    supports_row_sharding: ClassVar[bool] = False

    #: Most (prepared-gradient = state) elements updated together by `_apply_updates`. The batched path's fp32
    #: temporaries (dequantised 8-bit moments, cast gradients, denominators, low-rank directions) are a few times
    #: this, so it bounds the extra memory of a step (2**23 elements: 32 MiB per temporary list).
    foreach_chunk_elements: ClassVar[int] = 1 << 23

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, **kwargs: Any) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, **self.low_rank_defaults(), **self.inner_defaults}
        unknown = [k for k in kwargs if k not in defaults]
        if unknown:
            raise InvalidConfigError(
                f"{type(self).__name__} got unknown argument(s) {unknown}; valid ones are {sorted(defaults)}."
            )
        defaults.update(kwargs)
        check_float_hyperparameters(defaults)
        # The projection knobs too: the defaults are what every low-rank group without its own values uses.
        self._check_configs(defaults, low_rank=True)
        self._validate_hyperparameters(defaults)
        self._ordinals: WeakIdKeyDictionary = WeakIdKeyDictionary()  # see _index_low_rank_params
        self._indexed: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._warned: set[str] = set()
        super().__init__(params, defaults)
        check_unhooked((p for g in self.param_groups for p in g["params"]), self)
        self._index_low_rank_params()
        self._warn_full_rank_fallbacks()

    # ------------------------------------------------------------------------------------------------ setup
    def _check_configs(self, hp: dict[str, Any], low_rank: bool) -> None:
        """Run the range checks of `inner_configs` (and of `low_rank_config` when `low_rank`) on the values in `hp`.

        The configs' `__post_init__` are the only implementation of those checks, so an optimizer built in Python
        refuses exactly what `optim_args` would, with the same messages.

        Raises:
            [`InvalidConfigError`]: from the first config that refuses a value.
        """
        configs = list(self.inner_configs)
        if low_rank and self.low_rank_config is not None:
            configs.append(self.low_rank_config)
        for config in configs:
            config(**{f.name: hp[f.name] for f in dataclasses.fields(config)})

    def _validate_hyperparameters(self, hp: dict[str, Any]) -> None:
        """Checks only the optimizer can make, run on the constructor's defaults and on every param group after
        the configs' range checks: e.g. combinations of knobs from different configs (subclasses extend)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        allowed = set(self.defaults) | _FOREIGN_GROUP_KEYS
        unknown = [k for k in param_group if k not in allowed]
        if unknown:
            raise InvalidConfigError(
                f"Unknown param-group key(s) {unknown} for {type(self).__name__}; valid keys are {sorted(allowed)}."
            )
        if "rank" in param_group and "low_rank" not in param_group:
            # galore-torch's API: a group that sets `rank` is the group to project.
            param_group = {**param_group, "low_rank": True}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_float_hyperparameters(group)
        if group["low_rank"] and self.low_rank_config is None:
            raise InvalidConfigError(
                f"{type(self).__name__} projects no parameter (it has no projection knobs); remove low_rank=True from "
                "the param group, or use a GaLore optimizer."
            )
        self._check_configs(group, low_rank=group["low_rank"])
        self._validate_hyperparameters(group)
        if group["low_rank"]:
            for p in group["params"]:
                if p.dim() != 2:
                    raise InvalidConfigError(
                        f"A low_rank group holds a parameter of shape {tuple(p.shape)}; GaLore projects 2-D weights "
                        "only. Put biases, norms and embeddings-like tensors in a group with low_rank=False."
                    )
        self._check_sharded_params(group)
        if hasattr(self, "_ordinals"):
            self._index_low_rank_params()

    def _check_sharded_params(self, group: dict[str, Any]) -> None:
        """Refuse, before the first step, DTensor parameters this optimizer or `group`'s settings cannot step.

        FSDP2 (`fully_shard`) parameters are supported by classes with `supports_row_sharding` (GaLore's and
        WeLore's AdamW and 8-bit AdamW, GaLoreAdafactor, FloraAdamW, FloraAdafactor): one `Shard(0)` over a 1-D
        mesh; projected weights on the right side (see `row_sharded_side`), the others stepped elementwise on the
        local rows.

        Raises:
            [`UnsupportedSetupError`]: naming what is supported.
        """
        sharded = [p for p in group["params"] if is_dtensor(p)]
        if not sharded:
            return
        name = type(self).__name__
        if not self.supports_row_sharding:
            raise UnsupportedSetupError(
                f"{name} does not support FSDP2 (DTensor) parameters yet; GaLoreAdamW and GaLoreAdamW8bit "
                "(optim='galore_adamw' / 'galore_adamw_8bit') step on fully_shard's row shards, and so do "
                "GaLoreAdafactor, WeLoreAdamW and WeLoreAdamW8bit (on a WeLore-split model), FloraAdamW and "
                "FloraAdafactor (not their layer-wise or accumulating variants). Use one of them, or DDP."
            )
        for p in sharded:
            row_sharding(p, owner=name)
            if not group["low_rank"]:
                continue
            try:
                side = row_sharded_side(p.shape, group["proj_type"], group["rank"])
            except ValueError as err:
                raise UnsupportedSetupError(f"{name} under FSDP2: {err}") from None
            if side != Side.NONE and group.get("svd", "randomized") != "randomized":  # FLoRA has no svd knob
                raise UnsupportedSetupError(
                    f"{name} under FSDP2: svd={group['svd']!r} needs the whole m×n gradient of the weight of shape "
                    f"{tuple(p.shape)} on one process (an all-gather of m×n at every refresh); use "
                    "svd='randomized' (the default), whose sketches are all-reduced as n×(rank+oversample) matrices."
                )

    def _index_low_rank_params(self) -> None:
        """Number the projected weights in group order: the number seeds the range finder and the stagger offset.

        Weak references: accelerate's FSDP2 preparation swaps the parameters in `param_groups` for FSDP2's shards
        (see [`_follow_replaced_params`]) so that the unsharded tensors can be freed; holding them here would keep a
        whole copy of the model alive on every process.
        """
        low_rank = [p for g in self.param_groups if g["low_rank"] for p in g["params"]]
        self._ordinals = WeakIdKeyDictionary({p: i for i, p in enumerate(low_rank)})
        self._indexed = WeakIdKeyDictionary({p: None for g in self.param_groups for p in g["params"]})

    def _follow_replaced_params(self) -> None:
        """Re-check and re-number the parameters when `param_groups` holds other tensors than at construction.

        The Trainer's FSDP2 path builds the optimizer on the plain parameters, then `Accelerator.prepare` shards the
        model (`fully_shard`) and puts the DTensor parameters into `param_groups` in place of the old ones
        (`accelerate.utils.fsdp_utils.fsdp2_switch_optimizer_parameters`), in the same order. So before the first
        step the new parameters get the checks a DTensor gets at construction (before any update) and the same
        ordinals, hence the same seeds, as the tensors they replace.
        """
        # A copied or unpickled optimizer has no index (torch's Optimizer pickles defaults, state and groups only).
        indexed = getattr(self, "_indexed", None)
        if indexed is not None and all(p in indexed for g in self.param_groups for p in g["params"]):
            return
        for group in self.param_groups:
            self._check_sharded_params(group)
        self._index_low_rank_params()

    def _warn_full_rank_fallbacks(self) -> None:
        shapes = [
            tuple(p.shape)
            for g in self.param_groups
            if g["low_rank"]
            for p in g["params"]
            if choose_side(p.shape, g["proj_type"], g["rank"]) == Side.NONE
        ]
        if shapes:
            warnings.warn(
                f"{len(shapes)} projected weight(s) have min(m, n) ≤ rank and use the plain full-rank update "
                f"instead, still multiplied by `scale` so their step size stays the projected weights' "
                f"(shapes: {sorted(set(shapes))}). Lower `rank` or leave them out of optim_target_modules to "
                "silence this.",
                UserWarning,
                stacklevel=3,
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    # ------------------------------------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        side = Side.NONE
        # A DTensor (FSDP2) parameter: the side, seed and fallback follow its global shape, its state the local shard.
        local = local_tensor(p)
        if group["low_rank"]:
            side = (row_sharded_side if is_dtensor(p) else choose_side)(p.shape, group["proj_type"], group["rank"])
        state["side"] = int(side)
        if side != Side.NONE:
            ordinal = self._ordinals[p]
            state["seed"] = mix_seed(group["seed"], ordinal)
            state["refresh_count"] = 0
            gap = group["update_proj_gap"]
            state["refresh_offset"] = (ordinal * gap) // max(len(self._ordinals), 1) if group["stagger"] else 0
            shape = low_rank_shape(local.shape, side, group["rank"])
        else:
            shape = tuple(local.shape)
        self._init_inner_state(state, shape, p, group, low_rank=side != Side.NONE)
        return state

    #: The `optim=` names registered for this class (filled in by `hf_galore.registry.register_optimizer`).
    optim_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.optim_names = ()  # each class lists its own names, never its parent's
        # Derived from the configs, never written twice; a class that declares neither inherits its parent's (which
        # may be a hand-written `inner_defaults` of a subclass outside hf_galore).
        declares = "inner_configs" in cls.__dict__ or "engine_defaults" in cls.__dict__
        if declares and "inner_defaults" not in cls.__dict__:
            cls.inner_defaults = cls._derive_inner_defaults()
        _CLASSES_BY_NAME[cls.__name__] = cls

    #: Other `kind`s of the state signature this class reads (names its state layout had before a rename).
    legacy_state_kinds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _state_kind(cls) -> str:
        """The optimizer whose state layout this class writes (layer-wise variants write their base's)."""
        return cls.__name__

    #: State keys whose 1-D tensors hold the same values on every process of a row-sharded (FSDP2) parameter
    #: (besides the bases, `proj_*`): the column statistics of Adafactor and FLoRA, means over all rows of a 2-D
    #: tensor, all-reduced at every step. A ≥2-D tensor under such a key (the statistics of a ≥3-D parameter, which
    #: average over unsharded dimensions) follows the rows, as every other tensor state does.
    replicated_state_keys: ClassVar[frozenset[str]] = frozenset()

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim.Optimizer.state_dict()` plus a plain-data signature (optimizer kind, state format) that
        `load_state_dict` checks.

        For a row-sharded (FSDP2) parameter, the states that follow its rows (moments, FLoRA's row statistics) are
        DTensors with `Shard(0)` on the parameter's mesh and the global shape, and the replicated ones (bases,
        counters, seeds) are plain tensors and numbers equal on every process: what
        `torch.distributed.checkpoint` (and `get_optimizer_state_dict`) needs to save a state that any number of
        processes can load. No collective, except for 8-bit states whose blocks straddle the shards (see
        `LowRankAdamW8bit`).
        """
        state_dict = super().state_dict()
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for index, p in enumerate(params):  # torch numbers the states by the parameters' order in the groups
            state = state_dict["state"].get(index)
            if state is None:
                continue
            exported = dict(state)  # never modify the live state dict torch handed back
            if "side" in exported and Side(exported["side"]) != Side.NONE:
                # Always present, so every process' and every run's state has the same keys (a DCP load fills the
                # keys of the loading optimizer's own state dict only).
                exported.setdefault("nonfinite_skips", 0)
            sharding = row_sharding(p, type(self).__name__)
            if sharding is not None:
                exported = self._export_sharded_state(p, sharding, exported)
            state_dict["state"][index] = exported
        # The signature also rides in the param groups: `get_optimizer_state_dict` keeps only "state" and
        # "param_groups" of an optimizer's state dict.
        signature = {"kind": self._state_kind(), "format": STATE_FORMAT}
        for group in state_dict["param_groups"]:
            group[SIGNATURE_KEY] = dict(signature)
        state_dict[SIGNATURE_KEY] = signature
        return state_dict

    def _is_replicated_state(self, key: str, value: torch.Tensor) -> bool:
        """Whether state `key` (tensor `value`) of a row-sharded parameter is the same on every process (not split
        by rows)."""
        return key.startswith("proj_") or (key in self.replicated_state_keys and value.dim() <= 1)

    def _export_sharded_state(self, p: torch.Tensor, sharding: RowSharding, state: dict[str, Any]) -> dict[str, Any]:
        """The saved form of a row-sharded parameter's `state`: row-following tensors as `Shard(0)` DTensors of the
        global shape, everything else as it is (subclasses with other layouts, the 8-bit blocks, extend this)."""
        exported = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and not self._is_replicated_state(key, value):
                if int(value.shape[0]) != sharding.local_rows:
                    raise RuntimeError(
                        f"{type(self).__name__}: state {key!r} of a row-sharded parameter has shape "
                        f"{tuple(value.shape)}, but this process holds {sharding.local_rows} of its rows; a state "
                        "that is not split by rows must be listed in `replicated_state_keys`."
                    )
                value = row_dtensor(value, p, sharding.rows)
            exported[key] = value
        return exported

    def _import_sharded_state(self, p: torch.Tensor, sharding: RowSharding, saved: dict[str, Any]) -> dict[str, Any]:
        """This process' part of a saved state of a row-sharded parameter (the inverse of `_export_sharded_state`):
        its rows of the row-following tensors, whether saved as DTensors, whole tensors (one process, or a gathered
        state) or this process' rows (a per-process state dict); replicated tensors as they are."""
        imported = {}
        for key, value in saved.items():
            if isinstance(value, torch.Tensor) and not self._is_replicated_state(key, value):
                if value.dim() or is_dtensor(value):
                    value = rows_of(value, sharding, key)
            elif is_dtensor(value):
                value = value.full_tensor()
            imported[key] = value
        return imported

    def _projected_side(self, p: torch.Tensor, group: dict[str, Any]) -> Side | None:
        """The side this optimizer projects `p` on (None when its settings are refused anyway)."""
        if not group.get("low_rank"):
            return Side.NONE
        try:
            return (row_sharded_side if is_dtensor(p) else choose_side)(p.shape, group["proj_type"], group["rank"])
        except ValueError:  # refused by the constructor already
            return None

    def _check_saved_side(self, p: torch.Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        """Refuse a saved state projected on another side than this optimizer projects `p`: its moments and bases
        have other shapes, so it could only be loaded wrongly (see [`side_mismatch_message`])."""
        side = self._projected_side(p, group)
        if "side" in saved and side is not None and Side(int(saved["side"])) != side:
            raise InvalidConfigError(
                side_mismatch_message(
                    tuple(p.shape), Side(int(saved["side"])), side, group["proj_type"], is_dtensor(p)
                )
            )

    def _check_signature(self, signature: dict[str, Any] | None) -> None:
        """Refuse a state written by another optimizer (its keys and formats differ) or by a newer version."""
        if signature is None:  # written before signatures existed: nothing to check against
            return
        kind, fmt = signature.get("kind"), signature.get("format", 0)
        if kind != self._state_kind() and kind not in self.legacy_state_kinds:
            writers = [cls for cls in _CLASSES_BY_NAME.values() if cls._state_kind() == kind]
            names = sorted({name for cls in writers for name in cls.optim_names})
            raise InvalidConfigError(
                f"This optimizer state was written by {kind} (optim={' or '.join(map(repr, names)) or '?'}), but it "
                f"is being loaded into {type(self).__name__}: their states differ (moment layout, quantization, projections) and cannot be converted exactly. Resume "
                "with the optimizer that wrote the checkpoint, or, to switch optimizers, start from the checkpoint's "
                "weights without its optimizer state (delete optimizer.pt, under FSDP optimizer_0/ or optimizer.bin, "
                "from the checkpoint folder, or load the model with from_pretrained)."
            )
        if fmt > STATE_FORMAT:
            raise InvalidConfigError(
                f"This optimizer state has format {fmt}, written by a newer hf_galore (this one reads up to "
                f"{STATE_FORMAT}). Upgrade hf_galore to resume from it."
            )

    def _layout(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group settings that shape its saved per-weight state (see `_LAYOUT_KEYS`)."""
        layout: dict[str, Any] = {"low_rank": bool(group.get("low_rank", False))}
        if layout["low_rank"]:
            layout.update({k: group[k] for k in _LAYOUT_KEYS if k in group})
        uses_momentum = getattr(self, "_uses_momentum", None)  # FLoRA: an exp_avg only with momentum on
        if uses_momentum is not None:
            layout["momentum"] = bool(uses_momentum(group))
        elif "beta1" in group:  # Adafactor: an exp_avg unless beta1 is None
            layout["momentum"] = group["beta1"] is not None
        return layout

    def _settings_changes(self, saved_groups: list[dict[str, Any]]) -> list[dict[str, tuple[Any, Any]]]:
        """Per group, the settings of this run that differ from the checkpoint's: `{key: (saved, now)}`.

        Raises [`InvalidConfigError`] when a setting that shapes the saved state differs.
        """

        def plain(value: Any) -> Any:
            return tuple(value) if isinstance(value, list) else value

        changes = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved = {**self.defaults, **saved}  # an older checkpoint may lack newer keys
            now_layout, saved_layout = self._layout(group), self._layout(saved)
            for key in now_layout:
                if now_layout[key] != saved_layout.get(key):
                    what = "momentum on" if key == "momentum" else f"{key}="
                    raise InvalidConfigError(
                        f"The checkpoint's optimizer state (param group {index}) was saved with "
                        f"{what}{saved_layout.get(key)!r}, but this run has {what}{now_layout[key]!r}. The saved "
                        "per-weight state (moment shapes, stored seeds and refresh offsets) depends on it and cannot "
                        f"be converted. Resume with the checkpoint's setting ({key}={saved_layout.get(key)!r} in "
                        "optim_args), or start from the checkpoint's weights without its optimizer state (delete "
                        "optimizer.pt, under FSDP optimizer_0/ or optimizer.bin, from the checkpoint folder)."
                    )
            changes.append(
                {
                    key: (plain(saved[key]), plain(value))
                    for key, value in group.items()
                    if key not in _RESTORED_GROUP_KEYS
                    and key not in now_layout
                    and plain(saved.get(key)) != plain(value)
                }
            )
        return changes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load `state_dict`, keeping each state tensor's saved dtype (torch would cast all of them to the param's).

        Projection bases, fp32 moments of bf16 weights and uint8 8-bit states must keep their dtype; only their
        device follows the parameter.

        A state written by another optimizer, with other settings that shape the saved state (`rank`, `seed`,
        `stagger`, momentum on/off, ...), or with a weight projected on another side than this optimizer projects
        it, is refused with [`InvalidConfigError`] before anything is loaded. Other settings changed since the save
        (`update_proj_gap`, `scale`, `basis_bits`, `weight_decay`, `proj_type` where every side stays, ...) take
        this run's values, with a warning listing them; `lr` is restored from the checkpoint, as `torch.optim` does
        (the LR scheduler drives it).

        For a row-sharded (FSDP2) parameter each process keeps its rows of the row-following states, which may
        arrive as DTensors (a `torch.distributed.checkpoint` load), whole tensors (a one-process or gathered state
        dict) or this process' rows (its own per-process state dict); see `_import_sharded_state`.
        """
        signature = state_dict.get(SIGNATURE_KEY)
        if signature is None:  # through torch.distributed.checkpoint's state_dict API: the copy in the groups
            signature = next((g[SIGNATURE_KEY] for g in state_dict["param_groups"] if SIGNATURE_KEY in g), None)
        self._check_signature(signature)
        # Group keys this optimizer does not have are dropped: knobs of an older layout (FLoRA's groups carried
        # GaLore's refresh knobs before FLoRA had a config of its own) or of the class a legacy kind was written
        # by (WeLore's AdamW as GaLoreAdamW). Keeping them would save them again and make the groups unbuildable.
        allowed = set(self.defaults) | _FOREIGN_GROUP_KEYS
        groups = [{k: v for k, v in g.items() if k in allowed} for g in state_dict["param_groups"]]
        state_dict = {**state_dict, "param_groups": groups}
        changes = self._settings_changes(state_dict["param_groups"])
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = ((p, g) for g in self.param_groups for p in g["params"])
        for saved_id, (p, group) in zip(saved_ids, params):  # before anything is loaded
            if (saved := state_dict["state"].get(saved_id)) is not None:
                self._check_saved_side(p, group, saved)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != SIGNATURE_KEY})
        for group in self.param_groups:  # a checkpoint from an older version may lack newer keys: use the defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for group, changed in zip(self.param_groups, changes):
            for key, (_, value) in changed.items():
                group[key] = value
        described = sorted(
            {f"{k}: {saved!r} -> {now!r}" for changed in changes for k, (saved, now) in changed.items()}
        )
        if described:
            warnings.warn(
                "Resuming with settings that differ from the checkpoint's; this run's values are used from now on "
                f"({'; '.join(described)}). Bases stored in another basis_bits format are converted at their next "
                "refresh.",
                UserWarning,
                stacklevel=2,
            )
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = (p for g in self.param_groups for p in g["params"])
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            # Row-sharded states may come as DTensors, whole tensors or this process' rows, whatever number of
            # processes saved them (torch.distributed.checkpoint reshards): keep this process' part.
            sharding = row_sharding(p, type(self).__name__)
            if sharding is not None:
                saved = self._import_sharded_state(p, sharding, saved)
            state = self.state[p]
            state.clear()
            for key, value in saved.items():
                if is_dtensor(value):  # a sharded state loaded into one process
                    value = value.full_tensor()
                if isinstance(value, torch.Tensor):
                    value = value.to(device=local_tensor(p).device, copy=True)
                state[key] = value

    # ------------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_replaced_params()
        for group in self.param_groups:
            # The gradients are prepared lazily, chunk by chunk, so only one chunk of them is alive at a time.
            for chunk in self._in_chunks(self._prepared_gradients(group)):
                self._apply_updates(self._finite_only(chunk), group)
        return loss

    # A NaN/Inf gradient of a projected weight would enter its moments (and, at a refresh, its basis) and leave the
    # weight non-finite for good; its whole update is skipped instead, as a loss scaler skips a step.
    def _finite_only(
        self, prepared: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`prepared` without the projected weights whose prepared gradient has a NaN/Inf (counted, see
        `_skip_nonfinite`); one device synchronisation per device and call."""
        checked: dict[torch.device, list[int]] = {}
        sharded: dict[Any, list[int]] = {}  # row-sharded weights by process group
        for i, (p, _) in enumerate(prepared):
            if self.state[p].get("side", 0) != Side.NONE:
                if is_dtensor(p):
                    sharded.setdefault(p.device_mesh.get_group(), []).append(i)
                else:
                    checked.setdefault(prepared[i][1].device, []).append(i)
        skipped = set()
        for indices in checked.values():
            flags = torch.stack([torch.isfinite(prepared[i][1]).all() for i in indices]).tolist()
            skipped.update(i for i, finite in zip(indices, flags) if not finite)
        # A row-sharded weight is skipped on every process when any process' rows are non-finite (one process
        # stepping and another not would desynchronise their step counters, hence their refresh collectives): one
        # all-reduce of one number per sharded weight of the chunk, the only collective of an ordinary step.
        for process_group, indices in sharded.items():
            flags = torch.stack([(~torch.isfinite(prepared[i][1])).any() for i in indices]).to(torch.float32)
            all_reduce(flags, process_group, "sum")
            skipped.update(i for i, bad in zip(indices, flags.tolist()) if bad)
        for i in sorted(skipped):
            self._skip_nonfinite(prepared[i][0])
        return [pair for i, pair in enumerate(prepared) if i not in skipped] if skipped else prepared

    def _skip_nonfinite(self, p: torch.Tensor) -> None:
        """Count a skipped update of `p` in its state (`nonfinite_skips`); warn the first time."""
        state = self.state[p]
        state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
        self._warn_once(
            "nonfinite_skip",
            f"A projected weight of shape {tuple(p.shape)} got a NaN/Inf gradient at its update {state['step'] + 1}: "
            "its update was skipped (moments, basis and step counter unchanged), as it will be for any later one. "
            "Later skips are not warned again; optimizer.nonfinite_skips counts them (per weight: "
            "optimizer.state[p]['nonfinite_skips']). Check the loss scale, the learning rate and the data.",
        )

    @property
    def nonfinite_skips(self) -> int:
        """Updates of projected weights skipped because of a NaN/Inf gradient, over the whole run."""
        return sum(int(state.get("nonfinite_skips", 0)) for state in self.state.values())

    def _prepared_gradients(self, group: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`(parameter, prepared gradient)` of every parameter of `group` that has a gradient and a usable basis."""
        for p in group["params"]:
            if p.grad is not None and (low := self._prepare_gradient(p, p.grad, group)) is not None:
                yield p, low

    def _in_chunks(
        self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """`(parameter, gradient)` pairs grouped into lists of at most `foreach_chunk_elements` gradient elements (a
        larger single gradient alone). Lazy: each chunk is yielded before the next pair is drawn."""
        chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
        elements = 0
        for p, grad in pairs:
            # A row shard counts as its global row count, so every process cuts the same chunks (the non-finite
            # check of a chunk is a collective).
            numel = global_numel(p, tuple(grad.shape))
            if chunk and elements + numel > self.foreach_chunk_elements:
                yield chunk
                chunk, elements = [], 0
            chunk.append((p, grad))
            elements += numel
        if chunk:
            yield chunk

    def _refresh_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        """Whether the next update of this weight refreshes its basis (no basis yet, or a multiple of the gap)."""
        if not self._has_basis(state):
            return True
        return (state["step"] - state["refresh_offset"]) % group["update_proj_gap"] == 0

    # Basis storage: in the gradient dtype, or quantized (basis_bits 8/4; Q-GaLore: proj_bits).
    @classmethod
    def _basis_format(cls, group: dict[str, Any]) -> tuple[int, int]:
        """`(bits, group_size)` of the bases stored for `group`; 16 bits means unquantized."""
        return int(group["basis_bits"]), int(group["basis_group_size"])

    def _has_basis(self, state: dict[str, Any]) -> bool:
        return any(f"proj_{side}" in state or f"proj_{side}_q" in state for side in SIDES)

    def _bases(self, state: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(P, Q)` of this weight, as used for projection (P: m×r or None, Q: n×r or None)."""
        if "proj_bits" not in state:
            return state.get("proj_left"), state.get("proj_right")
        dtype = _DTYPES[state["proj_dtype"]]
        bases = []
        for side in SIDES:
            if f"proj_{side}_q" not in state:
                bases.append(None)
                continue
            shape = (state[f"proj_{side}_rows"], state[f"proj_{side}_cols"])
            codes, scales, zeros = (state[f"proj_{side}_{key}"] for key in ("q", "scales", "zeros"))
            bases.append(
                dequantize_packed(codes, scales, zeros, shape, state["proj_bits"], state["proj_group_size"], dtype)
            )
        return bases[0], bases[1]

    def _store_bases(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        p_basis: torch.Tensor | None,
        q_basis: torch.Tensor | None,
    ) -> None:
        """Keep freshly computed bases (called after every successful refresh), in the group's format."""
        for side in SIDES:  # a resumed run may have changed the format: drop the other one's keys
            state.pop(f"proj_{side}", None)
            for key in _PACKED_KEYS:
                state.pop(f"proj_{side}_{key}", None)
        for key in ("proj_bits", "proj_group_size", "proj_dtype"):
            state.pop(key, None)
        bits, group_size = self._basis_format(group)
        for side, basis in zip(SIDES, (p_basis, q_basis)):
            if basis is None:
                continue
            if bits >= 16:
                state[f"proj_{side}"] = basis
                continue
            codes, scales, zeros = quantize_packed(basis, bits, group_size)
            state[f"proj_{side}_q"], state[f"proj_{side}_scales"], state[f"proj_{side}_zeros"] = codes, scales, zeros
            state[f"proj_{side}_rows"], state[f"proj_{side}_cols"] = (int(d) for d in basis.shape)
        if bits < 16:
            dtype = (p_basis if p_basis is not None else q_basis).dtype
            state["proj_bits"], state["proj_group_size"], state["proj_dtype"] = bits, group_size, _DTYPES.index(dtype)

    def _refresh(
        self,
        grad: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        side: Side,
        sharding: RowSharding | None = None,
    ) -> bool:
        """Recompute the basis from `grad` (finite: `_prepare_gradient` skips the whole update of a non-finite one);
        on a failed decomposition keep the old basis.

        With `sharding`, `grad` is this process' row block of a row-sharded weight and the right basis comes from the
        distributed range finder ([`sharded_right_basis`]): the same Ω as one process, sketches all-reduced, the
        identical basis on every process."""
        generator = torch.Generator(device=grad.device)
        generator.manual_seed(mix_seed(state["seed"], state["refresh_count"]))
        mode = group["refresh_signs"]
        try:
            if sharding is not None:
                q_basis = sharded_right_basis(
                    grad,
                    sharding.offset,
                    sharding.rows,
                    group["rank"],
                    group["power_iters"],
                    group["oversample"],
                    generator,
                    lambda t: all_reduce(t, sharding.group, "sum"),
                    lambda t: all_reduce(t, sharding.group, "max"),
                    canonical=mode != "svd",
                )
                p_basis, q_basis = None, q_basis.to(grad.dtype)
            else:
                p_basis, q_basis = compute_bases(
                    grad,
                    side,
                    group["rank"],
                    group["svd"],
                    group["power_iters"],
                    group["oversample"],
                    generator,
                    canonical=mode != "svd",
                )
        except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
            self._warn_once(
                "svd_failed",
                f"The subspace decomposition failed ({err}); the previous basis is kept (or, on the first refresh, "
                "the update of that weight is skipped).",
            )
            return False
        if not all(bool(torch.isfinite(b).all()) for b in (p_basis, q_basis) if b is not None):
            self._warn_once(
                "svd_failed",
                "The subspace decomposition returned a non-finite basis; the previous basis is kept (or, on the first "
                "refresh, the update of that weight is skipped).",
            )
            return False
        if mode in ("aligned", "rotate") and self._has_basis(state):
            self._relate_to_previous(state, group, p_basis, q_basis, rotate=mode == "rotate")
        self._store_bases(state, group, p_basis, q_basis)
        state["refresh_count"] += 1
        return True

    def _relate_to_previous(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        p_basis: torch.Tensor | None,
        q_basis: torch.Tensor | None,
        rotate: bool,
    ) -> None:
        """Align the new bases' signs to the previous ones (in place); with `rotate`, also carry the moments into
        the new basis: a projected gradient R = Pᵀ G (left) becomes L R with L = P_newᵀ P_old, G Q (right) becomes
        R C with C = Q_oldᵀ Q_new."""
        old_p, old_q = self._bases(state)
        if any(
            new is not None and (old is None or old.shape != new.shape)
            for new, old in ((p_basis, old_p), (q_basis, old_q))
        ):
            return  # the side or rank changed (a resume with other settings): nothing to relate the new basis to
        if p_basis is not None and old_p is not None:
            align_signs(p_basis, old_p)
        if q_basis is not None and old_q is not None:
            align_signs(q_basis, old_q)
        if not rotate:
            return
        left = p_basis.float().T @ old_p.float() if p_basis is not None and old_p is not None else None
        right = old_q.float().T @ q_basis.float() if q_basis is not None and old_q is not None else None
        self._rotate_moments(state, group, left, right)

    def _rotate_moments(
        self, state: dict[str, Any], group: dict[str, Any], left: torch.Tensor | None, right: torch.Tensor | None
    ) -> None:
        """Express the low-rank moments in the new basis: a first moment M becomes `left @ M @ right` (missing
        factors are identities); an elementwise second moment V mixes with the squared entries, (left∘left) V
        (right∘right), its expectation when the coordinates are uncorrelated. Subclasses know their moments."""
        raise NotImplementedError(f"{type(self).__name__} does not support refresh_signs='rotate'.")

    def _value_tensors(self, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors that hold `p`'s value (what a data-parallel rank must receive from rank 0): `p.data` itself,
        or, for a parameter that only carries a gradient (Q-GaLore's INT8 weights), the buffers it stands for."""
        return (p.data,)

    def _state_for(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return self.state[p] if self.state[p] else self._init_state(p, group)

    def _prepare_gradient(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor | None:
        """The gradient the inner optimizer sees: refreshes the basis when due and projects `grad` onto it.

        Returns `grad` itself for non-projected parameters, and None when the weight has no usable basis (its first
        refresh failed): its update is then skipped.
        """
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        sharding = row_sharding(p, type(self).__name__)
        grad = local_tensor(grad)  # a DTensor's: this process' rows
        state = self._state_for(p, group)
        side = Side(state["side"])
        if side == Side.NONE:
            return grad
        if self._refresh_due(state, group):
            finite = torch.isfinite(grad).all()
            if sharding is not None:  # every process must skip the refresh (and its collectives) together
                finite = finite.to(torch.float32).reshape(1)
                all_reduce(finite, sharding.group, "sum")
                finite = finite == sharding.group.size()
            if not bool(finite):  # the basis would come from it: skip the whole update
                self._skip_nonfinite(p)
                return None
            if sharding is not None:
                refreshed = self._refresh(grad, state, group, side, sharding)
            else:
                refreshed = self._refresh(grad, state, group, side)
            if not refreshed and not self._has_basis(state):
                return None  # no basis yet: skip this weight's update rather than crash
        return project(grad, side, *self._bases(state))

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """One inner-optimizer update of `p` from its prepared (projected, for projected weights) gradient."""
        state = self._state_for(p, group)
        state["step"] += 1
        side = Side(state["side"])
        p = local_tensor(p)  # state is keyed by the parameter, the arithmetic runs on this process' shard
        if side == Side.NONE:
            self._plain_update(p, grad, state, group)
            return
        self._low_rank_update(p, grad, state, group, self._back_projector(p, state, group))

    def _fallback_scale(self, group: dict[str, Any]) -> float:
        """Factor of the plain update: `scale` in a low-rank group, whose weights too small to project (rank ≥
        min(m, n)) take the plain update in place of the projected one and keep its step size α·lr; 1 elsewhere."""
        return float(group["scale"]) if group["low_rank"] else 1.0

    def _back_projector(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> ApplyBack:
        """`apply_back(update, alpha, beta=1.0)`: weight ← beta · weight + alpha · scale · back-projection of
        `update` on the current basis."""
        side = Side(state["side"])
        p_basis, q_basis = self._bases(state)
        scale = group["scale"]

        def apply_back(update: torch.Tensor, alpha: float, beta: float = 1.0) -> None:
            if beta == 0:  # lr·wd == 1: addmm_ would ignore the weight (NaNs included) rather than multiply it by 0
                p.mul_(beta)
                beta = 1.0
            self._add_back_projected(p, update, side, p_basis, q_basis, alpha * scale, beta)

        return apply_back

    def _add_back_projected(
        self,
        p: torch.Tensor,
        update: torch.Tensor,
        side: Side,
        p_basis: torch.Tensor | None,
        q_basis: torch.Tensor | None,
        alpha: float,
        beta: float = 1.0,
    ) -> None:
        """weight ← beta · weight + alpha · back-projection of `update` (subclasses with non-float weights override)."""
        add_projected_back_(p, update, side, p_basis, q_basis, alpha, beta)

    def _apply_updates(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        """Apply the inner updates of several parameters of `group` from their prepared gradients.

        This base version updates them one by one; subclasses batch the elementwise work across parameters (each
        parameter's update reads only its own state, so the order of the parameters does not matter).
        """
        for p, grad in prepared:
            self._apply_update(p, grad, group)

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Update one parameter from its gradient (used by `step` and by the layer-wise hooks)."""
        prepared = self._prepare_gradient(p, p.grad, group)
        if prepared is not None and self._finite_only([(p, prepared)]):
            self._apply_update(p, prepared, group)

    # ------------------------------------------------------------------------------------------------ byte rules
    # What `_init_state` / `_store_bases` allocate, from a shape and the group's settings (no tensor needed), for
    # hf_galore.memory: each engine states the rule of the storage it owns, and the estimator only sums them.

    #: Bytes of fp32 temporaries per element updated together (Adam: denominator and low-rank direction; Adafactor:
    #: the fp32 gradient and the update).
    update_workspace_bytes: ClassVar[int] = 8

    #: Whether the method's model surgery converts each targeted weight (its `weight_bytes` then differ, and a weight
    #: tied to another module cannot be a target).
    converts_targets: ClassVar[bool] = False

    #: State keys that reference the model's own buffers rather than optimizer-owned storage.
    weight_state_keys: ClassVar[tuple[str, ...]] = ()

    #: Whether the memory estimator builds the model as saved after the method's model surgery (the converted
    #: modules a checkpoint's config records) instead of the dense architecture.
    estimates_converted_model: ClassVar[bool] = False

    @classmethod
    def memory_estimate_refusal(cls, model: torch.nn.Module) -> str | None:
        """Why the memory estimator cannot model this optimizer on `model` (a meta-device model), or None."""
        return None

    @classmethod
    def projected_side(cls, shape: tuple[int, ...], settings: dict[str, Any], target: bool) -> Side:
        """The side `_init_state` projects for a parameter of `shape` (Side.NONE: plain update)."""
        if not target or cls.low_rank_config is None or len(shape) != 2:
            return Side.NONE
        return choose_side(shape, settings["proj_type"], settings["rank"])

    @classmethod
    def weight_bytes(cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, target: bool) -> int:
        """Bytes of the parameter in the model (a method that converts its targets overrides this)."""
        return math.prod(shape) * element_size(dtype)

    @classmethod
    def inner_state_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, low_rank: bool
    ) -> int:
        """Bytes of `_init_inner_state(state, shape, ..., low_rank)` for a parameter of dtype `dtype`."""
        raise NotImplementedError

    @classmethod
    def plain_update_elements(cls, numel: int) -> int:
        """Elements updated at once by the plain update of a `numel`-element parameter."""
        return numel

    @classmethod
    def basis_bytes(cls, shape: tuple[int, int], side: Side, settings: dict[str, Any], dtype: torch.dtype) -> int:
        """Bytes `_store_bases` keeps: P (m×r) and/or Q (n×r) in the gradient dtype, or packed (INT4: half a byte,
        INT8: one per element) with fp32 scale and zero per `group_size` elements."""
        bits, group_size = cls._basis_format(settings)
        total = 0
        for rows in cls._basis_rows(shape, side):
            numel = rows * settings["rank"]
            if bits >= 16:
                total += numel * element_size(dtype)
            else:
                total += (math.ceil(numel / 2) if bits == 4 else numel) + 8 * num_groups(numel, group_size)
        return total

    @staticmethod
    def _basis_rows(shape: tuple[int, int], side: Side) -> list[int]:
        """Rows of each stored basis: m for P (left), n for Q (right)."""
        m, n = shape
        return [m] * (side in (Side.LEFT, Side.FULL)) + [n] * (side in (Side.RIGHT, Side.FULL))

    @classmethod
    def refresh_bytes(cls, shape: tuple[int, int], side: Side, settings: dict[str, Any], dtype: torch.dtype) -> int:
        """fp32 workspace of one refresh (the sides of `full` are computed one after the other): the randomized range
        finder's sketch and its QR/power-iteration partner, or the exact SVD's U, S, Vh; plus an fp32 copy of a
        gradient that is not fp32 (`left_basis` works on one)."""
        m, n = shape
        copy = 0 if dtype == torch.float32 else 4 * m * n
        if settings["svd"] == "exact":
            return copy + 4 * min(m, n) * (m + n + 1)
        return copy + 4 * 2 * (m + n) * min(settings["rank"] + settings["oversample"], m, n)

    @classmethod
    def param_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, target: bool
    ) -> ParamBytes:
        """The bytes a trainable parameter of `shape` and `dtype` costs this optimizer (see [`ParamBytes`]).

        Args:
            shape (`tuple[int, ...]`): The parameter's shape.
            settings (`dict`): The group's settings (`low_rank_defaults()`, `inner_defaults` and the overrides).
            dtype (`torch.dtype`): The parameter's (and gradient's) dtype.
            target (`bool`): Whether it is in a `low_rank=True` group.
        """
        numel, elem = math.prod(shape), element_size(dtype)
        weights = cls.weight_bytes(shape, settings, dtype, target)
        side = cls.projected_side(shape, settings, target)
        if side == Side.NONE:
            return ParamBytes(
                weights=weights,
                states=cls.inner_state_bytes(shape, settings, dtype, low_rank=False),
                prepared=numel * elem,
                update_elements=cls.plain_update_elements(numel),
            )
        low = math.prod(low_rank_shape(shape, side, settings["rank"]))
        return ParamBytes(
            weights=weights,
            states=cls.inner_state_bytes(low_rank_shape(shape, side, settings["rank"]), settings, dtype, True),
            bases=cls.basis_bytes(shape, side, settings, dtype),
            projected=True,
            prepared=low * elem,
            accumulator=low * elem,
            refresh=cls.refresh_bytes(shape, side, settings, dtype),
            update_elements=low,
        )

    # ------------------------------------------------------------------------------------------------ inner
    def _init_inner_state(
        self, state: dict[str, Any], shape: tuple[int, ...], p: torch.Tensor, group: dict[str, Any], low_rank: bool
    ) -> None:
        """Allocate the inner optimizer's state for a (projected) gradient of `shape`.

        For a row-sharded (DTensor) `p`, `shape` is this process' rows of it (allocate like `local_tensor(p)`); a
        decision that must not depend on the number of processes uses the global size ([`global_numel`])."""
        raise NotImplementedError

    def _plain_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        """Full-rank update of a non-projected parameter (state["step"] already incremented)."""
        raise NotImplementedError

    def _low_rank_update(
        self,
        p: torch.Tensor,
        low: torch.Tensor,
        state: dict[str, Any],
        group: dict[str, Any],
        apply_back: ApplyBack,
    ) -> None:
        """Inner update on the projected gradient `low`; apply it with `apply_back(update, alpha)`."""
        raise NotImplementedError


def side_mismatch_message(shape: tuple[int, ...], saved: Side, side: Side, proj_type: str, sharded: bool) -> str:
    """Why a saved state of a weight of `shape` projected on side `saved` cannot load into an optimizer that projects
    it on `side`, and what to do.

    The side depends on the setup as well as on `proj_type`: under FSDP2 `std` means the right side, while one
    process' `std` projects a wide weight (m < n) on the left.
    """
    if sharded:
        fix = (
            "Under FSDP2 a weight is projected on the right side only, so this state cannot continue there: resume it "
            "on one process (without fully_shard) with the checkpoint's proj_type, or start the sharded run from the "
            "checkpoint's weights without its optimizer state."
        )
    elif saved == Side.RIGHT:
        fix = (
            "A state saved under FSDP2 (where proj_type='std' means the right side) continues on one process with "
            "proj_type='right': build the optimizer with proj_type='right' (optim_args 'proj_type=right')."
        )
    else:
        fix = f"Build the optimizer with a proj_type that projects this weight on the {saved.name.lower()} side."
    setup = "row-sharded (FSDP2)" if sharded else "one process"
    return (
        f"The optimizer state of a weight of shape {shape} was saved projected on the {saved.name.lower()} side, but "
        f"this optimizer (proj_type={proj_type!r}, {setup}) projects it on the {side.name.lower()} side: its moments "
        f"and bases have other shapes and cannot be converted. {fix}"
    )


def global_numel(p: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Elements of a state of local `shape` (whose first dimension is the parameter's rows) across all processes: the
    global row count times the row size for a row-sharded (DTensor) `p`, `prod(shape)` otherwise."""
    if not is_dtensor(p) or not shape:
        return math.prod(shape)
    return int(p.shape[0]) * math.prod(shape[1:])


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's `(1 - β1ᵗ, sqrt(1 - β2ᵗ))`, computed exactly as `torch.optim.AdamW` does (Python floats)."""
    return 1 - beta1**step, (1 - beta2**step) ** 0.5


def rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square of `tensor`."""
    return tensor.norm(2) / math.sqrt(tensor.numel())


# Deprecated: GaLore's defaults now come from its optimizers' `low_rank_config` (`GaLoreConfig`).
__getattr__ = moved_attributes(__name__, {"LOW_RANK_DEFAULTS": "hf_galore.methods.galore.config"})
