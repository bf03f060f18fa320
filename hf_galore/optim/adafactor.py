"""The Adafactor inner engine of the low-rank skeleton ([`LowRankAdafactor`]): Adafactor (Shazeer & Stern, 2018)
on the projected gradient, `transformers.Adafactor` semantics on every other parameter.

Adafactor needs a few global numbers of each tensor: the means over its rows of the squared gradient (the column
statistics) and of the row statistics, the RMS of the update (clipping) and of the weight (`scale_parameter`). An
update is therefore written once, as a generator of [`Steps`] that asks for these numbers ([`Request`]) and gets
them back. On one process each request is answered from the tensor itself ([`run_locally`], the same operations as
always). On FSDP2 row shards ([`run_over_rows`]) every request is answered from the local rows' sums, summed over
the processes: the requests of all parameters of a chunk are answered together, one all-reduce per round (two
rounds per step), so the bytes exchanged are those small vectors, never a weight or a gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Generator
from typing import Any, ClassVar

import torch

from ..configs import AdafactorConfig
from ..errors import InvalidConfigError
from ..projection.subspace import Side, change_basis
from ._sharding import RowSharding, all_reduce, is_dtensor, local_tensor, row_sharding
from .base import ApplyBack, LowRankOptimizer, rms

#: What an update asks of all the rows of a tensor: `("mean", t)`, the mean of `t` over its first dimension (the rows
#: FSDP2 shards; keepdim for a 1-D `t`), or `("rms", t)`, the root mean square of `t`.
Request = tuple[str, torch.Tensor]
#: An update as a generator: it yields lists of requests, receives their answers in the same order, and returns
#: what its caller needs (or None). Every process must yield the same requests in the same order.
Steps = Generator[list[Request], list[torch.Tensor], Any]


def run_locally(steps: Steps) -> Any:
    """Run `steps` on one process, answering each request from the tensor itself; return the generator's value."""
    try:
        requests = next(steps)
        while True:
            answers = [
                tensor.mean(dim=0, keepdim=tensor.dim() == 1) if kind == "mean" else rms(tensor)
                for kind, tensor in requests
            ]
            requests = steps.send(answers)
    except StopIteration as stop:
        return stop.value


def run_over_rows(tasks: list[tuple[RowSharding, Steps]]) -> None:
    """Run the updates of several row-sharded parameters (each with its [`RowSharding`]) together, answering their
    requests over all rows: per round, one all-reduce per process group of every pending request's local sums
    (a mean over the rows: the column sums; an RMS: one sum of squares), then divided by the global row count or
    element count. An update that has finished drops out; since every process takes the same decisions, every
    process runs the same rounds with the same sizes."""
    pending = []
    for sharding, steps in tasks:
        requests = next(steps, None)
        if requests is not None:
            pending.append((sharding, steps, requests))
    while pending:
        answers = _answers_over_rows([(sharding, requests) for sharding, _, requests in pending])
        still = []
        for (sharding, steps, _), answer in zip(pending, answers):
            with contextlib.suppress(StopIteration):  # that update is done
                still.append((sharding, steps, steps.send(answer)))
        pending = still


def _answers_over_rows(batch: list[tuple[RowSharding, list[Request]]]) -> list[list[torch.Tensor]]:
    """The answers to every request of `batch`, from one all-reduce (sum) per process group."""
    by_group: dict[Any, list[int]] = {}
    for index, (sharding, _) in enumerate(batch):
        by_group.setdefault(sharding.group, []).append(index)
    answers: list[list[torch.Tensor]] = [[] for _ in batch]
    for process_group, indices in by_group.items():
        parts = [
            (tensor.sum(dim=0, keepdim=tensor.dim() == 1) if kind == "mean" else tensor.square().sum()).reshape(-1)
            for index in indices
            for kind, tensor in batch[index][1]
        ]
        if not parts:
            continue
        sums = torch.cat([part.float() for part in parts])
        all_reduce(sums, process_group, "sum")
        pieces = iter(sums.split([part.numel() for part in parts]))
        for index in indices:
            rows = batch[index][0].rows
            for kind, tensor in batch[index][1]:
                piece = next(pieces)
                if kind == "mean":  # a sum over all rows, divided by their number
                    answers[index].append(piece.view(tensor.shape[1:] or (1,)) / rows)
                else:  # elements of the whole tensor: the global rows times the row size
                    answers[index].append((piece[0] / (rows * math.prod(tensor.shape[1:]))).sqrt())
    return answers


class LowRankAdafactor(LowRankOptimizer):
    """Adafactor (Shazeer & Stern, 2018) on the projected gradient; `transformers.Adafactor` semantics elsewhere.

    The second moment of each 2-D (projected) gradient is factored into row and column statistics, so its state is
    r + max(m, n) numbers instead of m·n.

    Subclasses that declare `supports_row_sharding` step on FSDP2 row shards: each update runs on the local rows
    and gets its global means and RMS from [`run_over_rows`] (two small all-reduces per chunk of parameters).

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
    #: A 2-D tensor's column statistics are means over all its rows (all-reduced on row shards): the same on every
    #: process, saved whole (see `LowRankOptimizer.replicated_state_keys`).
    replicated_state_keys: ClassVar[frozenset[str]] = frozenset({"exp_avg_sq_col"})

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
    def _step_size(group: dict[str, Any], step: int, param_rms: torch.Tensor | None) -> float:
        """Adafactor's step size: `lr` or the relative step, times the weight's RMS (`param_rms`, given when
        `scale_parameter`)."""
        step_size = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            step_size = min(min_step, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            step_size *= max(group["eps"][1], float(param_rms))
        return step_size

    def _normalized_steps(
        self, grad32: torch.Tensor, state: dict[str, Any], group: dict[str, Any], p: torch.Tensor, clip: bool = True
    ) -> Generator[list[Request], list[torch.Tensor], tuple[torch.Tensor, float]]:
        """Adafactor's second-moment-normalised update of a fp32 gradient, RMS-clipped when `clip`, and the step size
        for weight `p` (the local rows of a sharded one): `(update, step_size)`.

        Asks in one round for the means over the rows that the factored second moment needs (the column statistics
        and the mean of the row statistics, of a 2-D tensor, whose rows are what FSDP2 shards) and the weight's RMS,
        and in a second round for the update's RMS. A 1-D tensor's second moment is elementwise and a ≥3-D tensor's
        statistics average over unsharded dimensions, so neither asks for a mean."""
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        square = grad32**2 + group["eps"][0]
        requests: list[Request] = [("rms", p.float())] if group["scale_parameter"] else []
        factored = "exp_avg_sq_row" in state
        over_rows = factored and square.dim() == 2
        if factored:
            row = state["exp_avg_sq_row"]
            row.mul_(beta2t).add_(square.mean(dim=-1), alpha=1.0 - beta2t)
            if over_rows:
                requests += [("mean", square), ("mean", row)]
        answers = (yield requests) if requests else []
        step_size = self._step_size(group, state["step"], answers[0] if group["scale_parameter"] else None)
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            col_mean, row_mean = answers[-2:] if over_rows else (square.mean(dim=-2), row.mean(dim=-1, keepdim=True))
            col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
            r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad32)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(square, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad32)
        if clip:
            update = yield from self._clipped_steps(update, group)
        return update, step_size

    @staticmethod
    def _clipped_steps(
        update: torch.Tensor, group: dict[str, Any]
    ) -> Generator[list[Request], list[torch.Tensor], torch.Tensor]:
        """`update` divided by max(1, RMS(update) / clip_threshold), in place (one round: the update's RMS)."""
        (update_rms,) = yield [("rms", update)]
        return update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0))

    def _momentum(self, update: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        if group["beta1"] is None:
            return update
        exp_avg = state["exp_avg"]
        exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        return exp_avg

    def _plain_steps(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> Steps:
        p32 = p if p.dtype == torch.float32 else p.float()
        update, step_size = yield from self._normalized_steps(grad.float(), state, group, p32)
        update = self._momentum(update.mul_(step_size), state, group)
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * step_size)
        p32.add_(update, alpha=-self._fallback_scale(group))
        if p32 is not p:
            p.copy_(p32)

    def _low_rank_steps(self, p, low, state, group, apply_back: ApplyBack) -> Steps:
        update, step_size = yield from self._normalized_steps(low.float(), state, group, p)
        update = self._momentum(update.mul_(step_size), state, group)
        apply_back(update, -1.0, 1 - group["weight_decay"] * step_size)  # decay folded into the addmm_, as in AdamW

    def _plain_update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        run_locally(self._plain_steps(p, grad, state, group))

    def _low_rank_update(self, p, low, state, group, apply_back: ApplyBack) -> None:
        run_locally(self._low_rank_steps(p, low, state, group, apply_back))

    # ------------------------------------------------------------------------------------------------ FSDP2
    def _sharded_steps(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> Steps:
        """The update of a row-sharded parameter from its prepared (local) gradient, as steps for [`run_over_rows`]
        (what `_apply_update` runs on one process)."""
        state = self._state_for(p, group)
        state["step"] += 1
        p = local_tensor(p)
        if Side(state["side"]) == Side.NONE:
            return self._plain_steps(p, grad, state, group)
        return self._low_rank_steps(p, grad, state, group, self._back_projector(p, state, group))

    def _apply_sharded_updates(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        """Update row-sharded parameters together: their global means and RMS in two all-reduces per process group."""
        if prepared:
            run_over_rows([(row_sharding(p), self._sharded_steps(p, grad, group)) for p, grad in prepared])

    def _apply_updates(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        local = [pair for pair in prepared if not is_dtensor(pair[0])]
        if local:
            super()._apply_updates(local, group)
        self._apply_sharded_updates([pair for pair in prepared if is_dtensor(pair[0])], group)

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if is_dtensor(p):  # its means and RMS are over all processes' rows
            self._apply_sharded_updates([(p, grad)], group)
        else:
            super()._apply_update(p, grad, group)
