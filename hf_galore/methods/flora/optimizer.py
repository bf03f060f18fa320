"""FLoRA optimizers (Hao et al., 2024, arXiv:2402.03293): compressed momentum through seeded random projections.

For each weight of a `low_rank=True` group (an m×n weight, rank r < min(m, n)):

* the **second moment** is Adafactor's factored row/column estimate of the *full* gradient (m + n numbers); it is
  never projected, because a random projection of a non-negative statistic is not non-negative;
* the **first moment** M is kept compressed (r×n or m×r) through a Gaussian projection P (N(0, 1/r) entries,
  E[P Pᵀ] = I) regenerated from an int seed. The applied momentum is β·up(M) + (1−β)·(fresh term), the fresh term
  entering uncompressed; every `kappa` steps P is resampled and M is transferred, M ← down_new(up_old(M));
* with gradient accumulation, the micro-step gradients of these weights are accumulated compressed (by the
  [`LayerwiseMixin`] hooks, through its `_compress_gradient` hook) with a projection that is fixed within one
  accumulation window and resampled for the next, and decompressed once at the boundary. The layer-wise names update
  in the hooks; the plain names build `Flora*Accumulating`, whose hooks only accumulate and whose `step()` updates.

Every other parameter gets the plain inner update of the parent class (`transformers.Adafactor` /
`torch.optim.AdamW` semantics). The state holds tensors and Python ints only: per weight `seed`, `generator` (the
projection generator's version, see [`hf_galore.projection.random`]; absent in states written before it existed,
which keep the legacy CPU generator), `step`, `resample_count` (the κ phase is `step % kappa`), `rows`, `cols`,
`side`; no projection is ever stored.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ...errors import InvalidConfigError
from ...optim._sharding import all_reduce, is_dtensor, local_tensor
from ...optim.adafactor import LowRankAdafactor, Steps, run_locally
from ...optim.adamw import LowRankAdamW
from ...optim.base import ParamBytes, bias_corrections, element_size, mix_seed
from ...optim.layerwise import LayerwiseMixin
from ...projection.random import (
    GENERATOR_PHILOX,
    GENERATOR_TORCH_CPU,
    GENERATORS,
    compress,
    decompress,
    gaussian_projection,
    projected_dim,
    transfer,
)
from ...projection.subspace import Side, choose_side, low_rank_shape, row_sharded_side
from .config import FloraAdafactorConfig, FloraConfig

#: Independent seed streams of one weight: the momentum projection (indexed by resampling count) and the
#: accumulation projection (indexed by optimizer step).
MOMENTUM_STREAM = 1
ACCUMULATION_STREAM = 2

#: Adafactor's regulariser of the squared gradient, also used by FloraAdamW's factored second moment so that an
#: all-zero row cannot divide by zero.
_EPS_SQUARE = 1e-30


class _FloraMixin:
    """The FLoRA machinery shared by [`FloraAdafactor`] and [`FloraAdamW`] (mixed in before the inner engine).

    Its projection knobs are [`FloraConfig`]'s (rank, kappa, proj_type, seed); GaLore's refresh knobs are not
    arguments of a FLoRA optimizer, so passing one is refused as an unknown argument.
    """

    low_rank_config: ClassVar[type] = FloraConfig

    #: Under FSDP2 the column statistics of the factored second moment are means over all rows, the same on every
    #: process; the momentum and the row statistics follow the weight's rows.
    replicated_state_keys: ClassVar[frozenset[str]] = frozenset({"exp_avg_sq_col"})

    # ------------------------------------------------------------------------------------------------ setup
    # kappa, proj_type (one-sided only), rank and seed are checked by `FloraConfig` (the base class runs it on the
    # defaults and on every low-rank group); what only the optimizer can check is the rank against each weight.
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]  # type: ignore[attr-defined]
        if not group["low_rank"]:
            return
        for p in group["params"]:
            if group["rank"] > min(p.shape):
                raise InvalidConfigError(
                    f"FLoRA rank={group['rank']} exceeds the smaller dimension of a targeted weight of shape "
                    f"{tuple(p.shape)}: a random projection cannot have more columns than the dimension it "
                    f"compresses. Lower rank to at most {min(p.shape)}, or leave that module out of "
                    "optim_target_modules."
                )

    # ------------------------------------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]  # type: ignore[attr-defined]
        state["step"] = 0
        # A row-sharded (FSDP2) weight is compressed on the right (its n×r projection is the same on every process);
        # its states are allocated for this process' rows.
        choose = row_sharded_side if is_dtensor(p) else choose_side
        side = choose(p.shape, group["proj_type"], group["rank"]) if group["low_rank"] else Side.NONE
        state["side"] = int(side)
        local = local_tensor(p)
        if side == Side.NONE:
            self._init_inner_state(state, tuple(local.shape), p, group, low_rank=False)  # type: ignore[attr-defined]
            return state
        state["seed"] = mix_seed(group["seed"], self._ordinals[p])  # type: ignore[attr-defined]
        state["generator"] = GENERATOR_PHILOX  # states written before this key existed use the legacy CPU generator
        state["resample_count"] = 0
        state["rows"], state["cols"] = (int(d) for d in p.shape)
        kwargs = {"dtype": torch.float32, "device": p.device}
        if self._uses_momentum(group):
            state["exp_avg"] = torch.zeros(low_rank_shape(local.shape, side, group["rank"]), **kwargs)
        state["exp_avg_sq_row"] = torch.zeros(local.shape[0], **kwargs)
        state["exp_avg_sq_col"] = torch.zeros(local.shape[1], **kwargs)
        return state

    @classmethod
    def _uses_momentum(cls, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ byte rules
    @classmethod
    def param_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, target: bool
    ) -> ParamBytes:
        """A compressed weight (m×n): the fp32 compressed momentum (r×n or m×r, with momentum) and the fp32 factored
        second moment of the full gradient (m + n), no stored basis (`_init_state`); its update reads the full
        gradient, and its layer-wise accumulator is the fp32 compressed gradient. The workspace of one update holds
        the two momentum projections (old and resampled, dim×r fp32). Other parameters: the inner engine's rules."""
        if target and settings["rank"] > min(shape):  # refused by `add_param_group` too
            raise InvalidConfigError(
                f"FLoRA rank={settings['rank']} exceeds the smaller dimension of a targeted weight of shape {shape}. "
                f"Lower rank to at most {min(shape)}, or leave that module out of optim_target_modules."
            )
        side = cls.projected_side(shape, settings, target)
        if side == Side.NONE:
            return super().param_bytes(shape, settings, dtype, target)  # type: ignore[misc]
        numel, m, n = math.prod(shape), shape[0], shape[1]
        low = math.prod(low_rank_shape(shape, side, settings["rank"]))
        return ParamBytes(
            weights=cls.weight_bytes(shape, settings, dtype, target),  # type: ignore[attr-defined]
            states=4 * (m + n) + (4 * low if cls._uses_momentum(settings) else 0),
            projected=True,
            prepared=numel * element_size(dtype),
            accumulator=4 * low,
            refresh=2 * 4 * projected_dim(shape, side) * settings["rank"],
            update_elements=numel,
        )

    def _fallback_scale(self, group: dict[str, Any]) -> float:
        return 1.0  # FLoRA has no `scale`: a weight it cannot compress takes the plain update as it is

    # ------------------------------------------------------------------------------------------------ projections
    def projection(self, state: dict[str, Any], stream: int, index: int, rank: int) -> torch.Tensor:
        """The fp32 projection of one weight for `stream` ([`MOMENTUM_STREAM`] or [`ACCUMULATION_STREAM`]) and
        `index` (resampling count or optimizer step), regenerated from its seed on the weight's device."""
        side = Side(state["side"])
        dim = projected_dim((state["rows"], state["cols"]), side)
        device = state["exp_avg_sq_row"].device
        # A checkpoint written before the on-device generator has no "generator" key: it keeps the CPU generator
        # its projections came from, so it resumes exactly.
        generator = state.get("generator", GENERATOR_TORCH_CPU)
        if generator not in GENERATORS:
            raise InvalidConfigError(
                f"The FLoRA optimizer state names projection generator {generator!r}, which this version of hf_galore "
                f"does not know (known: {GENERATORS}); the checkpoint was written by a newer version. Upgrade "
                "hf_galore to resume it."
            )
        seed = mix_seed(state["seed"], stream, index)
        return gaussian_projection(seed, dim, rank, device=device, generator=generator)

    def _accumulation_projection(self, state: dict[str, Any], rank: int) -> torch.Tensor:
        # Indexed by the step being accumulated: fixed within one window, fresh for the next.
        return self.projection(state, ACCUMULATION_STREAM, state["step"], rank)

    # ------------------------------------------------------------------------------------------------ step
    def _prepare_gradient(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """FLoRA's update reads the full gradient (only the statistics are compressed)."""
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
        self._state_for(p, group)  # type: ignore[attr-defined]
        return local_tensor(grad)  # a DTensor's: this process' rows

    def _apply_updates(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        """Compressed weights one by one (FLoRA's update is per weight); the plain parameters as the parent class does
        (batched by `FloraAdamW` when `foreach=True`)."""
        plain = []
        for p, grad in prepared:
            state = self._state_for(p, group)  # type: ignore[attr-defined]
            if Side(state["side"]) == Side.NONE:
                plain.append((p, grad))
            else:
                self._apply_update(p, grad, group)
        if plain:
            super()._apply_updates(plain, group)  # type: ignore[misc]

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """One update from a full gradient, or from a compressed accumulator handed over by the layer-wise hooks
        (recognised by its shape, which differs from the weight's since rank < min(m, n))."""
        state = self._state_for(p, group)  # type: ignore[attr-defined]
        side = Side(state["side"])
        if side == Side.NONE:
            state["step"] += 1
            self._plain_update(local_tensor(p), local_tensor(grad), state, group)  # type: ignore[attr-defined]
            return
        grad = local_tensor(grad).float()
        if grad.shape != local_tensor(p).shape:
            grad = decompress(grad, side, self._accumulation_projection(state, group["rank"]))
        state["step"] += 1
        self._flora_update(p, grad, state, group)

    def _flora_update(self, p: torch.Tensor, grad32: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        raise NotImplementedError

    def _compressed_momentum(
        self, state: dict[str, Any], group: dict[str, Any], fresh: torch.Tensor, beta: float
    ) -> torch.Tensor:
        """β·up(M) + (1−β)·fresh (returned, full size); then resample on κ boundaries and M ← β·M + (1−β)·down(fresh).

        The fresh term enters the applied momentum uncompressed (no projection noise on the newest information);
        only the history is compressed.
        """
        side, rank, exp_avg = Side(state["side"]), group["rank"], state["exp_avg"]
        old = self.projection(state, MOMENTUM_STREAM, state["resample_count"], rank)
        applied = decompress(exp_avg, side, old).mul_(beta).add_(fresh, alpha=1 - beta)
        current = old
        if state["step"] % group["kappa"] == 0:
            state["resample_count"] += 1
            current = self.projection(state, MOMENTUM_STREAM, state["resample_count"], rank)
            exp_avg.copy_(transfer(exp_avg, side, old, current))
        exp_avg.mul_(beta).add_(compress(fresh, side, current), alpha=1 - beta)
        return applied


class _FloraLayerwiseMixin(LayerwiseMixin):
    """Compressed gradient accumulation for FLoRA weights in the layer-wise hooks."""

    def _full_gradient_step(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> bool:
        # Under DDP a FLoRA weight always all-reduces its compressed gradient (m/r less traffic), accumulation or not.
        return False

    def _keeps_full_gradient(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], sync: bool) -> bool:
        # A window of one micro-step (no accumulation, or nothing accumulated yet at the boundary) uses the exact
        # full gradient; otherwise every micro-step is compressed, so no full gradient outlives its backward.
        return sync and p not in self._low_rank_grads

    def _compress_gradient(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        group = self._group_of(p)
        projection = self._accumulation_projection(state, group["rank"])  # type: ignore[attr-defined]
        # Projected in the gradient's dtype (no m×n fp32 copy), accumulated in fp32.
        return compress(grad, Side(state["side"]), projection.to(grad.dtype)).float()


class FloraAdafactor(_FloraMixin, LowRankAdafactor):
    """Adafactor with FLoRA's compressed first moment (the paper's optimizer).

    For a targeted weight with gradient G: the factored second moment V̂ of G (Adafactor, β2ₜ = 1 − t^decay_rate),
    U = G / √V̂, applied = β1·up(M) + (1 − β1)·U, M ← β1·M + (1 − β1)·down(U) (with resampling and transfer every
    `kappa` steps), applied /= max(1, RMS(applied)/clip_threshold), then W ← W − lr·wd·W − lr·applied, where lr is
    Adafactor's step size (`lr`, times RMS(W) with `scale_parameter`, or the relative step). Other parameters follow
    `transformers.Adafactor`.

    Args:
        params (`Iterable`): Parameters or param groups; `low_rank=True` groups hold the 2-D weights to compress.
        lr (`float`, defaults to 1e-3): Learning rate (ignored when `relative_step=True`).
        beta1 (`float`, *optional*, defaults to 0.9): Momentum coefficient; `None` or 0 keeps no first moment.
        kappa (`int`, defaults to 1000): Steps between resamplings of the momentum projection.
        rank (`int`, defaults to 128): Rank of the projections (≤ min(m, n) of every targeted weight).
        proj_type (`str`, defaults to `"std"`): Compressed side (`std`, `reverse_std`, `left`, `right`).
        seed (`int`, defaults to 0): Base seed of the projections.
        **kwargs: Adafactor knobs (`eps`, `clip_threshold`, `decay_rate`, `scale_parameter`, `relative_step`,
            `warmup_init`, `weight_decay`), see [`AdafactorConfig`].

    Example:
        ```python
        >>> groups = [{"params": other_params}, {"params": linear_weights, "low_rank": True}]
        >>> optimizer = FloraAdafactor(groups, lr=1e-3, rank=64, kappa=1000)
        ```
    """

    inner_configs: ClassVar[tuple[type, ...]] = (FloraAdafactorConfig,)  # momentum on by default (beta1=0.9)
    #: Steps on FSDP2 (`fully_shard`) row shards, compressed on the right: see docs/how_to/fsdp2.md.
    supports_row_sharding: ClassVar[bool] = True

    @classmethod
    def _uses_momentum(cls, group: dict[str, Any]) -> bool:
        return bool(group["beta1"])

    def _flora_update(self, p: torch.Tensor, grad32: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        run_locally(self._flora_steps(p, grad32, state, group))

    def _flora_steps(
        self, p: torch.Tensor, grad32: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> Steps:
        """FLoRA's update of compressed weight `p` (this process' rows of a sharded one) from its full gradient."""
        p32 = p if p.dtype == torch.float32 else p.float()
        # Adafactor's factored normalisation without its clipping: FLoRA clips the applied (momentum) update.
        update, step_size = yield from self._normalized_steps(grad32, state, group, p32, clip=False)
        if "exp_avg" in state:
            update = self._compressed_momentum(state, group, update, group["beta1"])
        update = yield from self._clipped_steps(update, group)
        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=-group["weight_decay"] * step_size)
        p32.add_(update, alpha=-step_size)
        if p32 is not p:
            p.copy_(p32)

    # FSDP2 row shards: the compressed weights join the engine's batched rounds (column statistics, row mean and RMS
    # of all the chunk's parameters summed over the processes together) instead of being updated one by one.
    def _apply_updates(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        local = [pair for pair in prepared if not is_dtensor(pair[0])]
        if local:
            super()._apply_updates(local, group)
        self._apply_sharded_updates([pair for pair in prepared if is_dtensor(pair[0])], group)

    def _apply_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if is_dtensor(p):  # its column statistics, row mean and RMS are over all processes' rows
            self._apply_sharded_updates([(p, grad)], group)
        else:
            super()._apply_update(p, grad, group)

    def _sharded_steps(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> Steps:
        """A compressed weight's FLoRA update from its local full gradient (accumulating variants, whose gradient
        arrives compressed, refuse row shards); other parameters the engine's."""
        state = self._state_for(p, group)
        if Side(state["side"]) == Side.NONE:
            return super()._sharded_steps(p, grad, group)
        state["step"] += 1
        return self._flora_steps(local_tensor(p), grad.float(), state, group)


class FloraAdamW(_FloraMixin, LowRankAdamW):
    """AdamW-like FLoRA: compressed first moment, Adafactor-factored second moment, AdamW's lr semantics.

    For a targeted weight with gradient G: row/column EMAs (β2) of G² give the factored V̂; m = β1·up(M) + (1−β1)·G,
    M ← β1·M + (1 − β1)·down(G) (resampled and transferred every `kappa` steps); then W ← W·(1 − lr·wd) −
    lr/(1 − β1ᵗ) · m / (√(V̂/(1 − β2ᵗ)) + eps). The second moment is never projected (a projected v can go negative).
    Other parameters follow `torch.optim.AdamW` exactly.

    Args:
        params (`Iterable`): Parameters or param groups; `low_rank=True` groups hold the 2-D weights to compress.
        lr (`float`, defaults to 1e-3): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Moment coefficients; β1 = 0 keeps no momentum.
        eps (`float`, defaults to 1e-8): Term added to the denominator.
        weight_decay (`float`, defaults to 0.0): Decoupled weight decay.
        kappa (`int`, defaults to 1000): Steps between resamplings of the momentum projection.
        **kwargs: `rank`, `proj_type`, `seed`, see [`FloraConfig`].

    Example:
        ```python
        >>> groups = [{"params": other_params}, {"params": linear_weights, "low_rank": True}]
        >>> optimizer = FloraAdamW(groups, lr=1e-3, rank=64, kappa=1000)
        ```
    """

    #: Steps on FSDP2 (`fully_shard`) row shards, compressed on the right: see docs/how_to/fsdp2.md.
    supports_row_sharding: ClassVar[bool] = True

    @classmethod
    def _uses_momentum(cls, group: dict[str, Any]) -> bool:
        return group["betas"][0] > 0

    def _flora_update(self, p: torch.Tensor, grad32: torch.Tensor, state: dict[str, Any], group: dict[str, Any]):
        beta1, beta2 = group["betas"]
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        square = grad32.square().add_(_EPS_SQUARE)
        row.mul_(beta2).add_(square.mean(dim=-1), alpha=1 - beta2)
        if is_dtensor(p):
            # Rows sharded (FSDP2): the column statistics and the mean of the row statistics are over all rows, so
            # one all-reduce of n + 1 fp32 numbers per weight and step (the local sums), then divided by m.
            sums = torch.cat([square.sum(dim=-2), row.sum().view(1)])
            all_reduce(sums, p.device_mesh.get_group(), "sum")
            sums.div_(p.shape[0])
            col.mul_(beta2).add_(sums[:-1], alpha=1 - beta2)
            row_mean = sums[-1]
            p = local_tensor(p)
        else:
            col.mul_(beta2).add_(square.mean(dim=-2), alpha=1 - beta2)
            row_mean = row.mean()
        bias_correction1, bias_correction2_sqrt = bias_corrections(beta1, beta2, state["step"])
        second = torch.outer(row / row_mean, col)
        denom = second.sqrt_().div_(bias_correction2_sqrt).add_(group["eps"])
        momentum = self._compressed_momentum(state, group, grad32, beta1) if "exp_avg" in state else grad32
        p32 = p if p.dtype == torch.float32 else p.float()
        if group["weight_decay"] != 0:
            p32.mul_(1 - group["lr"] * group["weight_decay"])
        p32.addcdiv_(momentum, denom, value=-group["lr"] / bias_correction1)
        if p32 is not p:
            p.copy_(p32)


class _FloraAccumulatingMixin(_FloraLayerwiseMixin):
    """Compressed gradient accumulation for the non-layer-wise names: the hooks only accumulate (r×n / m×r per
    targeted weight, the full gradient freed at every micro-step); every update runs in `step()` at the boundary."""

    updates_in_hooks = False


class FloraAdafactorLayerwise(_FloraLayerwiseMixin, FloraAdafactor):
    """[`FloraAdafactor`] stepping each weight in its backward hook, accumulating compressed gradients."""


class FloraAdamWLayerwise(_FloraLayerwiseMixin, FloraAdamW):
    """[`FloraAdamW`] stepping each weight in its backward hook, accumulating compressed gradients."""


class FloraAdafactorAccumulating(_FloraAccumulatingMixin, FloraAdafactor):
    """[`FloraAdafactor`] accumulating compressed gradients in backward hooks and stepping in `step()`: what
    `optim="flora_adafactor"` builds with `gradient_accumulation_steps > 1` (unless `accumulation=full`)."""


class FloraAdamWAccumulating(_FloraAccumulatingMixin, FloraAdamW):
    """[`FloraAdamW`] accumulating compressed gradients in backward hooks and stepping in `step()`: what
    `optim="flora_adamw"` builds with `gradient_accumulation_steps > 1` (unless `accumulation=full`)."""
