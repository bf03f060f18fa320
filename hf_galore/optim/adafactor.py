"""The Adafactor inner engine of the low-rank skeleton ([`LowRankAdafactor`]): Adafactor (Shazeer & Stern, 2018)
on the projected gradient, `transformers.Adafactor` semantics on every other parameter.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..configs import AdafactorConfig
from ..errors import InvalidConfigError
from ..projection.subspace import change_basis
from .base import ApplyBack, LowRankOptimizer, rms


class LowRankAdafactor(LowRankOptimizer):
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
        **kwargs: The projection knobs of the subclass' `low_rank_config` (e.g. [`GaLoreConfig`]).
    """

    #: Adafactor's regularisers are not `optim_args` keys (transformers' `galore_adafactor` does not take them either).
    engine_defaults: ClassVar[dict[str, Any]] = {"eps": (1e-30, 1e-3)}
    inner_configs: ClassVar[tuple[type, ...]] = (AdafactorConfig,)

    @classmethod
    def inner_state_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, low_rank: bool
    ) -> int:
        """fp32 row + column statistics (the full vector for a 1-D tensor), plus `exp_avg` when `beta1` is set (as
        `_init_inner_state`)."""
        numel = math.prod(shape)
        second = (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) if len(shape) >= 2 else numel
        return 4 * (second + (numel if settings["beta1"] is not None else 0))

    def _validate_hyperparameters(self, hp: dict[str, Any]) -> None:
        super()._validate_hyperparameters(hp)
        if hp["lr"] is None and not hp["relative_step"]:
            raise InvalidConfigError(f"{type(self).__name__} needs an lr unless relative_step=True.")

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

    def _rotate_moments(self, state, group, left, right) -> None:
        if "exp_avg" in state:
            state["exp_avg"].copy_(change_basis(state["exp_avg"], left, right))
        # The factored second moment: only the statistic along a rotated (rank) axis moves, by the squared entries.
        if left is not None:
            row = state["exp_avg_sq_row"]
            row.copy_((left * left) @ row)
        if right is not None:
            col = state["exp_avg_sq_col"]
            col.copy_(col @ (right * right))

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
        p32.add_(update, alpha=-self._fallback_scale(group))
        if p32 is not p:
            p.copy_(p32)

    def _low_rank_update(self, p, low, state, group, apply_back: ApplyBack) -> None:
        step_size = self._step_size(group, state["step"], p)
        update = self._normalized_update(low.float(), state, group).mul_(step_size)
        update = self._momentum(update, state, group)
        apply_back(update, -1.0, 1 - group["weight_decay"] * step_size)  # decay folded into the addmm_, as in AdamW
