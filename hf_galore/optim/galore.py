"""GaLore optimizers: thin inner-optimizer declarations over [`LowRankOptimizer`].

* [`GaLoreAdamW`]: Adam moments of the projected gradient, in fp32.
* [`GaLoreAdamW8bit`]: the same moments stored 8-bit blockwise through bitsandbytes' public functional API.
* [`GaLoreAdafactor`]: Adafactor (factored second moment) on the projected gradient.

Non-projected parameters get exactly the plain inner update (`torch.optim.AdamW`, `transformers.Adafactor`
semantics).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..configs import Blockwise8bitConfig
from ..errors import InvalidConfigError
from ._quant8 import Blockwise8bitStore
from .base import ApplyBack, LowRankOptimizer, bias_corrections, rms


class GaLoreAdamW(LowRankOptimizer):
    """AdamW whose moments live in a rank-r subspace of each projected weight's gradient.

    Non-projected parameters follow `torch.optim.AdamW` exactly (decoupled weight decay before the update,
    bias-corrected moments, `eps` added after the square root).

    Args:
        params (`Iterable`): Parameters or param groups (see [`LowRankOptimizer`]).
        lr (`float`, defaults to 1e-3): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Adam's moment coefficients.
        eps (`float`, defaults to 1e-8): Term added to the denominator.
        weight_decay (`float`, defaults to 0.0): Decoupled weight decay on the full weight.
        **kwargs: GaLore knobs (`rank`, `update_proj_gap`, `scale`, `proj_type`, `svd`, ...), see [`GaLoreConfig`].

    Example:
        ```python
        >>> groups = [{"params": other_params}, {"params": linear_weights, "low_rank": True}]
        >>> optimizer = GaLoreAdamW(groups, lr=1e-3, rank=8, update_proj_gap=200, scale=0.25)
        ```
    """

    inner_defaults: ClassVar[dict[str, Any]] = {"betas": (0.9, 0.999), "eps": 1e-8}

    def _validate_hyperparameters(self, hp: dict[str, Any]) -> None:
        beta1, beta2 = hp["betas"]
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise InvalidConfigError(f"Invalid betas {hp['betas']}: both must be in [0, 1).")
        if hp["eps"] < 0:
            raise InvalidConfigError(f"Invalid eps {hp['eps']}: it must be ≥ 0.")

    # Storage of the two moments; the 8-bit subclass overrides these three methods.
    def _init_inner_state(
        self, state: dict[str, Any], shape: tuple[int, ...], p: torch.Tensor, group: dict[str, Any], low_rank: bool
    ) -> None:
        dtype = torch.float32 if low_rank else p.dtype
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)

    def _load_moments(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """32-bit moments were updated in place: nothing to store."""

    def _update_moments(self, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        """Update the moments with `grad`; return `(exp_avg, denom, step_size)` of the bias-corrected Adam step."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = self._load_moments(state)
        if grad.dtype != exp_avg.dtype:
            grad = grad.to(exp_avg.dtype)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self._store_moments(state, exp_avg, exp_avg_sq)
        bias_correction1, bias_correction2_sqrt = bias_corrections(beta1, beta2, state["step"])
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        return exp_avg, denom, group["lr"] / bias_correction1

    def _plain_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        exp_avg, denom, step_size = self._update_moments(grad, state, group)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _low_rank_update(self, p, low, state, group, apply_back: ApplyBack) -> None:
        exp_avg, denom, step_size = self._update_moments(low, state, group)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        apply_back(exp_avg / denom, -step_size)


class GaLoreAdamW8bit(GaLoreAdamW):
    """[`GaLoreAdamW`] with both moments stored 8-bit blockwise (dynamic quantisation maps, one absmax per block).

    States with fewer than `min_8bit_size` elements stay fp32. Quantisation goes through bitsandbytes' public
    `quantize_blockwise`/`dequantize_blockwise`; the state holds only the uint8 codes and fp32 absmax tensors.

    Args:
        block_size (`int`, defaults to 256): Elements per quantisation block.
        min_8bit_size (`int`, defaults to 4096): States smaller than this stay fp32.
        **kwargs: See [`GaLoreAdamW`].
    """

    inner_defaults: ClassVar[dict[str, Any]] = {**GaLoreAdamW.inner_defaults, "block_size": 256, "min_8bit_size": 4096}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._store = Blockwise8bitStore()
        super().__init__(*args, **kwargs)

    def _validate_hyperparameters(self, hp: dict[str, Any]) -> None:
        super()._validate_hyperparameters(hp)
        Blockwise8bitConfig(block_size=hp["block_size"], min_8bit_size=hp["min_8bit_size"])  # range checks

    def _init_inner_state(
        self, state: dict[str, Any], shape: tuple[int, ...], p: torch.Tensor, group: dict[str, Any], low_rank: bool
    ) -> None:
        if math.prod(shape) < group["min_8bit_size"]:
            super()._init_inner_state(state, shape, p, group, low_rank=True)  # small: fp32
            return
        block = group["block_size"]
        self._store.init(state, "exp_avg", shape, p.device, block, signed=True)
        self._store.init(state, "exp_avg_sq", shape, p.device, block, signed=False)

    def _load_moments(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return self._store.load(state, "exp_avg", signed=True), self._store.load(state, "exp_avg_sq", signed=False)

    def _store_moments(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if "exp_avg" not in state:
            self._store.save(state, "exp_avg", exp_avg, signed=True)
            self._store.save(state, "exp_avg_sq", exp_avg_sq, signed=False)


class GaLoreAdafactor(LowRankOptimizer):
    """Adafactor (Shazeer & Stern, 2018) on the projected gradient; `transformers.Adafactor` semantics elsewhere.

    The second moment of each 2-D (projected) gradient is factored into row and column statistics, so its state is
    r + max(m, n) numbers instead of m·n.

    Args:
        params (`Iterable`): Parameters or param groups (see [`LowRankOptimizer`]).
        lr (`float`, defaults to 1e-3): Learning rate (ignored when `relative_step=True`).
        eps (`tuple[float, float]`, defaults to `(1e-30, 1e-3)`): Regularisers of the squared gradient and of the
            parameter scale.
        clip_threshold (`float`, defaults to 1.0): Threshold of the update's RMS clipping.
        decay_rate (`float`, defaults to -0.8): Second-moment decay exponent.
        beta1 (`float`, *optional*): First-moment coefficient; `None` keeps no first moment.
        weight_decay (`float`, defaults to 0.0): Weight decay, scaled by the step size as in Adafactor.
        scale_parameter (`bool`, defaults to `False`): Multiply the step size by the weight's RMS.
        relative_step (`bool`, defaults to `False`): Use Adafactor's 1/√t step size instead of `lr`.
        warmup_init (`bool`, defaults to `False`): Warm the relative step up from 1e-6·t.
        **kwargs: GaLore knobs, see [`GaLoreConfig`].
    """

    inner_defaults: ClassVar[dict[str, Any]] = {
        "eps": (1e-30, 1e-3),
        "clip_threshold": 1.0,
        "decay_rate": -0.8,
        "beta1": None,
        "scale_parameter": False,
        "relative_step": False,
        "warmup_init": False,
    }

    def _validate_hyperparameters(self, hp: dict[str, Any]) -> None:
        if hp["warmup_init"] and not hp["relative_step"]:
            raise InvalidConfigError("warmup_init=True requires relative_step=True.")
        if hp["lr"] is None and not hp["relative_step"]:
            raise InvalidConfigError("GaLoreAdafactor needs an lr unless relative_step=True.")

    def _init_inner_state(
        self, state: dict[str, Any], shape: tuple[int, ...], p: torch.Tensor, group: dict[str, Any], low_rank: bool
    ) -> None:
        kwargs = {"dtype": torch.float32, "device": p.device}
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, **kwargs)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **kwargs)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **kwargs)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **kwargs)

    @staticmethod
    def _step_size(group: dict[str, Any], step: int, p: torch.Tensor) -> float:
        step_size = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            step_size = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            step_size *= max(group["eps"][1], float(rms(p.float())))
        return step_size

    @staticmethod
    def _normalized_update(grad32: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """Adafactor's second-moment-normalised, RMS-clipped update of a fp32 gradient (before the step size)."""
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad32**2 + group["eps"][0]
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad32)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad32)
        return update.div_((rms(update) / group["clip_threshold"]).clamp_(min=1.0))

    def _momentum(self, update: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        if group["beta1"] is None:
            return update
        exp_avg = state["exp_avg"]
        exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        return exp_avg

    def _plain_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        p32 = p if p.dtype == torch.float32 else p.float()
        step_size = self._step_size(group, state["step"], p32)
        update = self._normalized_update(grad.float(), state, group).mul_(step_size)
        update = self._momentum(update, state, group)
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * step_size)
        p32.add_(-update)
        if p32 is not p:
            p.copy_(p32)

    def _low_rank_update(self, p, low, state, group, apply_back: ApplyBack) -> None:
        step_size = self._step_size(group, state["step"], p)
        update = self._normalized_update(low.float(), state, group).mul_(step_size)
        update = self._momentum(update, state, group)
        if group["weight_decay"] != 0:
            p.add_(p, alpha=-group["weight_decay"] * step_size)
        apply_back(update, -1.0)
