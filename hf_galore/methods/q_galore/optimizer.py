"""Q-GaLore (Zhang et al., 2024, arXiv:2407.08296): GaLore's 8-bit AdamW ([`LowRankAdamW8bit`] with
[`GaLoreConfig`]'s knobs) with INT4 bases, a lazy layer-adaptive
refresh, and INT8 weights updated with stochastic rounding.

Per projected weight, on top of GaLore:

* **INT4 bases.** After each refresh the basis is quantized group-wise and stored packed two values per byte
  (`proj_left_q`/`proj_right_q` plus fp32 scales and zeros); it is dequantized for each projection.
* **Lazy, layer-adaptive refresh.** After each refresh, the |cosine similarity| between the new and the previous
  leading singular vector (kept in fp32, one vector per side) is pushed into a queue of `queue_size` values. When the
  queue is full and its mean is ≥ `cos_threshold`, this weight's refresh gap is multiplied by `gamma_proj` (capped at
  `max_proj_gap`) and the queue restarts. The absolute value matters: singular vectors have arbitrary signs, so an
  unchanged subspace may give cos ≈ −1 (the published code compares signed values and doubles the gap without
  bound). The gap, the next refresh step, the queue and the leading vectors are all optimizer state (ints and
  tensors), so a resumed run refreshes exactly when an uninterrupted one would.
* **INT8 weights.** A parameter that is the `grad_carrier` of an [`Int8Linear`] (found through a mapping derived at
  construction, never through state) is updated as: dequantize to fp32 → decoupled weight decay → add the
  projected-back Adam update → requantize, by default with stochastic rounding drawn from a generator seeded from
  `(sr_seed, step, weight index)`: every data-parallel rank rounds identically and a resumed run reproduces an
  uninterrupted one. The optimizer state also references each INT8 weight's codes, scales and zeros (the weights
  are the optimizer's master copy, as fp32 master weights are in mixed precision): the Trainer loads a checkpoint's
  model weights *before* it creates the optimizer, i.e. before the model surgery, so `load_state_dict` is where the
  INT8 weights of a resumed run are restored.
* **Data parallel (DDP).** DDP cannot wrap the carriers (its wrap-time broadcast writes into every element of a
  parameter; a carrier has one). The Trainer integration keeps them, and the INT8 buffers, out of DDP, and under
  several processes this optimizer gives the carriers what DDP gives its own parameters: a [`BackwardAllReduce`]
  averages their gradients at the end of each synchronising backward pass, before the Trainer clips and logs the
  norm, and construction broadcasts rank 0's INT8 weights. Every process then applies the same update to the same
  weights with the same seeded rounding, so the replicas stay identical without any broadcast of the INT8 buffers.
  (The layer-wise form reduces them in its own hooks and `step()` instead.)

Every other parameter is updated exactly as by [`GaLoreAdamW8bit`].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ...errors import InvalidConfigError
from ...modules.int8_linear import Int8Linear, owner_of
from ...optim.adamw import LowRankAdamW8bit
from ...optim.allreduce import BackwardAllReduce
from ...optim.base import SIDES, ApplyBack, ParamBytes, element_size, mix_seed
from ...optim.layerwise import LayerwiseMixin
from ...projection.quant import num_groups
from ...projection.subspace import Side, add_projected_back_
from ...utils.deprecation import moved_attributes
from ..galore.config import GaLoreConfig
from .config import QGaLoreConfig

#: State keys referencing an INT8 weight's buffers.
WEIGHT_KEYS = {"weight_q": "qweight", "weight_scales": "weight_scales", "weight_zeros": "weight_zeros"}


class QGaLoreAdamW8bit(LowRankAdamW8bit):
    """GaLore with 8-bit Adam states, INT4 projection bases, a lazy layer-adaptive refresh and INT8 weights.

    Put the `grad_carrier` of each [`Int8Linear`] in a `low_rank=True` group (an INT8 weight in a plain group gets a
    full-rank 8-bit Adam update, requantized the same way). Float weights in a low-rank group get GaLore with INT4
    bases and the lazy refresh; every other parameter is updated as by [`GaLoreAdamW8bit`].

    Args:
        params (`Iterable`): Parameters or param groups (see [`LowRankOptimizer`]).
        proj_bits (`int`, defaults to 4): Bits of the stored bases (4 packed two per byte, or 8).
        proj_group_size (`int`, defaults to 256): Elements per scale/zero of the bases.
        weight_bits (`int`, defaults to 8), weight_group_size (`int`, defaults to 256): The format the model surgery
            used for the INT8 weights; each weight is requantized in its own module's format, so these are recorded
            for completeness only.
        stochastic_round (`bool`, defaults to `True`): Stochastic (else nearest) rounding of updated INT8 weights.
        cos_threshold (`float`, defaults to 0.4), gamma_proj (`float`, defaults to 2.0), queue_size (`int`,
            defaults to 5), max_proj_gap (`int`, *optional*): The lazy refresh, see [`QGaLoreConfig`].
        sr_seed (`int`, defaults to 0): Seed of the stochastic rounding.
        sync_gradients (`Callable[[], bool]`, *optional*): With several processes (`torch.distributed` initialized),
            returns False on micro-steps that only accumulate, so the carriers' gradients are averaged once per
            optimizer step (the Trainer integration passes accelerate's `GradientState().sync_gradients`). Default:
            average after every backward, which is correct (the mean is linear) but communicates more.
        **kwargs: See [`GaLoreAdamW8bit`] and [`GaLoreConfig`].

    Example:
        ```python
        >>> layer = Int8Linear.from_linear(nn.Linear(64, 32))
        >>> optimizer = QGaLoreAdamW8bit([{"params": [layer.grad_carrier], "low_rank": True}], lr=1e-3, rank=8)
        ```
    """

    low_rank_config: ClassVar[type] = GaLoreConfig
    inner_configs: ClassVar[tuple[type, ...]] = (*LowRankAdamW8bit.inner_configs, QGaLoreConfig)

    #: Whether, under several processes, this class averages the carriers' gradients at the end of backward (the
    #: layer-wise subclass reduces them in its own hooks and `step()`).
    reduces_carriers_in_backward: ClassVar[bool] = True

    def __init__(
        self, params: Iterable[Any], *args: Any, sync_gradients: Callable[[], bool] | None = None, **kwargs: Any
    ) -> None:
        self._int8_modules: dict[torch.Tensor, Int8Linear] = {}
        self._int8_index: dict[torch.Tensor, int] = {}
        super().__init__(params, *args, **kwargs)
        #: Averages the carriers' gradients over the processes (None on one process; see the module doc).
        self.gradient_reduction: BackwardAllReduce | None = None
        carriers = list(self._int8_modules)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and carriers and self.reduces_carriers_in_backward:
            for p in carriers:
                for tensor in self._value_tensors(p):
                    dist.broadcast(tensor, src=0)  # DDP does not sync the INT8 buffers it is told to ignore
            self.gradient_reduction = BackwardAllReduce(carriers, sync_gradients)

    # ------------------------------------------------------------------------------------------------ setup
    def _validate_hyperparameters(self, hp: dict[str, Any]) -> None:
        super()._validate_hyperparameters(hp)
        # QGaLoreConfig's own ranges ran already (`inner_configs`); these combine its knobs with GaLoreConfig's.
        for knob, own in (("basis_bits", "proj_bits"), ("basis_group_size", "proj_group_size")):
            if hp[knob] != self.low_rank_defaults()[knob]:
                raise InvalidConfigError(
                    f"{knob}={hp[knob]} is GaLore's basis storage knob; Q-GaLore stores its bases with {own} "
                    f"(now {hp[own]}). Set {own} instead of {knob}."
                )
        cap = hp["max_proj_gap"]
        if cap is not None and cap < hp["update_proj_gap"]:
            raise InvalidConfigError(
                f"max_proj_gap={cap} is smaller than update_proj_gap={hp['update_proj_gap']}; the cap must be ≥ the "
                "initial gap. Raise max_proj_gap or leave it unset (16 × update_proj_gap)."
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # The derived carrier → module mapping (rebuilt from the groups, never saved in state).
        for p in self.param_groups[-1]["params"]:
            module = owner_of(p)
            if module is not None:
                self._int8_modules[p] = module
                self._int8_index[p] = len(self._int8_index)

    # ------------------------------------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._init_state(p, group)
        module = self._int8_modules.get(p)
        if module is not None:
            self._bind_weight(state, module)
        if state["side"] != Side.NONE:
            state["proj_gap"] = int(group["update_proj_gap"])
            state["next_refresh"] = 0
            state["cos_queue"] = torch.zeros(group["queue_size"], dtype=torch.float32, device=p.device)
            state["cos_count"] = 0
        return state

    def _value_tensors(self, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # A carrier holds no data (a zero-stride view): the weight is the module's codes, scales and zeros.
        module = self._int8_modules.get(p)
        if module is None:
            return super()._value_tensors(p)
        return tuple(getattr(module, buffer) for buffer in WEIGHT_KEYS.values())

    @staticmethod
    def _bind_weight(state: dict[str, Any], module: Int8Linear) -> None:
        for key, buffer in WEIGHT_KEYS.items():
            state[key] = getattr(module, buffer)

    def state_dict(self) -> dict[str, Any]:
        # Re-point the weight references first: a `.to()` of the model may have replaced the buffers.
        for p, module in self._int8_modules.items():
            if self.state.get(p):
                self._bind_weight(self.state[p], module)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load `state_dict` and write the saved INT8 weights into their modules (see the module doc)."""
        super().load_state_dict(state_dict)
        for p, module in self._int8_modules.items():
            state = self.state.get(p)
            if not state or "weight_q" not in state:
                continue
            with torch.no_grad():
                for key, buffer_name in WEIGHT_KEYS.items():
                    buffer = getattr(module, buffer_name)
                    saved = state[key]
                    if saved.shape != buffer.shape:
                        raise InvalidConfigError(
                            f"The checkpoint's {key} has shape {tuple(saved.shape)} but the model's INT8 weight has "
                            f"{tuple(buffer.shape)}: it was saved with another weight_group_size or model. Resume with "
                            "the optim_args and optim_target_modules of the saved run."
                        )
                    buffer.copy_(saved)
            self._bind_weight(state, module)

    # ------------------------------------------------------------------------------------------------ byte rules
    #: The model surgery stores each targeted weight as INT8 (a tied target cannot be quantized).
    converts_targets: ClassVar[bool] = True
    #: State keys referencing the model's INT8 buffers: weights, not optimizer state, for memory accounting.
    weight_state_keys: ClassVar[tuple[str, ...]] = tuple(WEIGHT_KEYS)

    @classmethod
    def weight_bytes(cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, target: bool) -> int:
        """A target is an [`Int8Linear`]: m·n uint8 codes, fp32 scale and zero per `weight_group_size` elements,
        and a one-element gradient carrier in `dtype`."""
        if not target:
            return super().weight_bytes(shape, settings, dtype, target)
        numel = math.prod(shape)
        return numel + 8 * num_groups(numel, settings["weight_group_size"]) + element_size(dtype)

    @classmethod
    def param_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, target: bool
    ) -> ParamBytes:
        """GaLore's 8-bit rules plus, per projected weight, the fp32 leading singular vector of each side and the fp32
        `cos_queue` (`_init_state`, `_store_bases`). The INT8 weight references in the state are weights."""
        result = super().param_bytes(shape, settings, dtype, target)
        if not result.projected:
            return result
        side = cls.projected_side(shape, settings, target)
        extra = 4 * sum(cls._basis_rows(shape, side)) + 4 * settings["queue_size"]
        return dataclasses.replace(result, states=result.states + extra)

    # ------------------------------------------------------------------------------------------------ bases
    @classmethod
    def _basis_format(cls, group: dict[str, Any]) -> tuple[int, int]:
        return int(group["proj_bits"]), int(group["proj_group_size"])

    def _store_bases(
        self,
        state: dict[str, Any],
        group: dict[str, Any],
        p_basis: torch.Tensor | None,
        q_basis: torch.Tensor | None,
    ) -> None:
        similarities = []
        for side, basis in zip(SIDES, (p_basis, q_basis)):
            if basis is None:
                continue
            # The leading singular vector stays fp32 (m or n numbers): INT4 noise would blur the similarity.
            lead = basis[:, 0].to(torch.float32)
            lead = lead / lead.norm().clamp_min(torch.finfo(torch.float32).tiny)
            previous = state.get(f"lead_{side}")
            if previous is not None:
                similarities.append(torch.dot(previous, lead).abs())
            state[f"lead_{side}"] = lead
        super()._store_bases(state, group, p_basis, q_basis)  # packed to proj_bits
        if similarities:
            self._record_similarity(state, group, float(torch.stack(similarities).mean()))

    @staticmethod
    def _record_similarity(state: dict[str, Any], group: dict[str, Any], similarity: float) -> None:
        """Push one |cos| into the weight's queue; grow its gap when a full queue's mean reaches the threshold."""
        queue, count = state["cos_queue"], state["cos_count"]
        if count < queue.numel():
            queue[count] = similarity
            count += 1
        else:
            queue.copy_(torch.roll(queue, -1))
            queue[-1] = similarity
        if count == queue.numel() and float(queue.mean()) >= group["cos_threshold"]:
            cap = group["max_proj_gap"] or 16 * group["update_proj_gap"]
            state["proj_gap"] = max(min(int(state["proj_gap"] * group["gamma_proj"]), cap), state["proj_gap"])
            count = 0  # the next growth needs `queue_size` fresh confirmations
        state["cos_count"] = count

    def _refresh_due(self, state: dict[str, Any], group: dict[str, Any]) -> bool:
        if not self._has_basis(state):
            return True
        return state["step"] >= state["next_refresh"]

    def _refresh(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any], side: Side) -> bool:
        first = not self._has_basis(state)
        refreshed = super()._refresh(grad, state, group, side)
        offset = state["refresh_offset"]
        # The first refresh honours the stagger offset, as the base class' schedule does; later ones the own gap.
        state["next_refresh"] = state["step"] + (offset if first and offset > 0 else state["proj_gap"])
        return refreshed

    # ------------------------------------------------------------------------------------------------ INT8 update
    def _rounding_generator(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], device: torch.device):
        if not group["stochastic_round"]:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(mix_seed(group["sr_seed"], state["step"], self._int8_index[p]))
        return generator

    def _write_int8(self, p: torch.Tensor, weight: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        module = self._int8_modules[p]
        module.set_weight_(weight, self._rounding_generator(p, state, group, weight.device))

    def _decayed_weight(self, module: Int8Linear, group: dict[str, Any]) -> torch.Tensor:
        weight = module.dequantize_weight(torch.float32)
        if group["weight_decay"] != 0:
            weight.mul_(1 - group["lr"] * group["weight_decay"])
        return weight

    def _apply_plain(self, p, exp_avg, denom, step_size: float, state: dict[str, Any], group: dict[str, Any]) -> None:
        module = self._int8_modules.get(p)
        if module is None:
            super()._apply_plain(p, exp_avg, denom, step_size, state, group)
            return
        weight = self._decayed_weight(module, group)
        weight.addcdiv_(exp_avg.float(), denom.float(), value=-step_size)
        self._write_int8(p, weight, state, group)

    def _apply_plain_many(self, params, exp_avgs, denoms, step_size: float, states, group: dict[str, Any]) -> None:
        floats = [i for i, p in enumerate(params) if p not in self._int8_modules]
        for i, p in enumerate(params):
            if p in self._int8_modules:
                self._apply_plain(p, exp_avgs[i], denoms[i], step_size, states[i], group)
        if floats:
            super()._apply_plain_many(
                [params[i] for i in floats],
                [exp_avgs[i] for i in floats],
                [denoms[i] for i in floats],
                step_size,
                [states[i] for i in floats],
                group,
            )

    def _apply_low_rank(self, p, direction, step_size: float, state, group, apply_back: ApplyBack) -> None:
        module = self._int8_modules.get(p)
        if module is None:
            super()._apply_low_rank(p, direction, step_size, state, group, apply_back)
            return
        weight = self._decayed_weight(module, group)
        p_basis, q_basis = (b.float() if b is not None else None for b in self._bases(state))
        alpha = -step_size * group["scale"]
        add_projected_back_(weight, direction.float(), Side(state["side"]), p_basis, q_basis, alpha)
        self._write_int8(p, weight, state, group)


class QGaLoreAdamW8bitLayerwise(LayerwiseMixin, QGaLoreAdamW8bit):
    """[`QGaLoreAdamW8bit`] stepping each parameter (INT8 weights included, through their carriers) inside its
    post-accumulate-grad hook, so the full gradients of the whole model are never alive at once."""

    # Under DDP the layer-wise hooks accumulate the carriers' (projected) gradients and `step()` all-reduces them.
    reduces_carriers_in_backward: ClassVar[bool] = False


# Deprecated: the defaults dict is derived from `QGaLoreConfig` where it lives now.
__getattr__ = moved_attributes(__name__, {"Q_GALORE_DEFAULTS": "hf_galore.methods.q_galore.config"})
