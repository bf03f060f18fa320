"""The AdamW inner engines of the low-rank skeleton: fp32 moments ([`LowRankAdamW`]) and 8-bit blockwise moments
([`LowRankAdamW8bit`], through bitsandbytes' public functional API).

They implement the inner-optimizer hooks of [`LowRankOptimizer`] and nothing about how a basis is found: a method's
optimizer (GaLore, Q-GaLore, FLoRA, WeLore under `hf_galore.methods`) composes one of them with its projection
knobs (`low_rank_config`). Non-projected parameters follow `torch.optim.AdamW` exactly.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..configs import Blockwise8bitConfig, MultiTensorConfig
from ..projection.subspace import Side, change_basis
from ._quant8 import Blockwise8bitStore
from ._sharding import RowSharding, all_reduce, chunk_split, is_dtensor, local_tensor, row_dtensor, rows_of
from .base import ApplyBack, LowRankOptimizer, bias_corrections, element_size, global_numel


def _scale_(tensors: list[torch.Tensor], factor: float) -> None:
    """`t.mul_(factor)` for every tensor, as one multi-tensor op where that gives the same numbers.

    `torch._foreach_mul_` rounds a Python scalar to the tensors' dtype before multiplying (on CPU at least), while
    `Tensor.mul_` multiplies in fp32 and rounds once: for bf16 a factor of 0.997 would become 0.99609. Half-precision
    lists therefore take the per-tensor loop.
    """
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        torch._foreach_mul_(tensors, factor)
    else:
        for tensor in tensors:
            tensor.mul_(factor)


class LowRankAdamW(LowRankOptimizer):
    """The AdamW engine: Adam moments of each projected weight's low-rank gradient, fp32.

    An engine, not an optimizer users pick: a method's optimizer subclasses it and sets `low_rank_config` (its
    projection knobs), e.g. `GaLoreAdamW` (GaLoreConfig) or `FloraAdamW` (FloraConfig). Non-projected parameters follow `torch.optim.AdamW` exactly (decoupled weight decay before the update,
    bias-corrected moments, `eps` added after the square root).

    Args:
        params (`Iterable`): Parameters or param groups (see [`LowRankOptimizer`]).
        lr (`float`, defaults to 1e-3): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Adam's moment coefficients.
        eps (`float`, defaults to 1e-8): Term added to the denominator.
        weight_decay (`float`, defaults to 0.0): Decoupled weight decay on the full weight.
        foreach (`bool`, defaults to `True`): Batch the elementwise work of a group (see [`MultiTensorConfig`]).
        **kwargs: The projection knobs of the subclass' `low_rank_config` (e.g. [`GaLoreConfig`]).

    Example:
        ```python
        >>> groups = [{"params": other_params}, {"params": linear_weights, "low_rank": True}]
        >>> from hf_galore import GaLoreAdamW  # LowRankAdamW with GaLoreConfig's knobs
        >>> optimizer = GaLoreAdamW(groups, lr=1e-3, rank=8, update_proj_gap=200, scale=0.25)
        ```
    """

    #: Adam's coefficients are not `optim_args` keys: the Trainer passes its `adam_beta1/2` and `adam_epsilon`.
    engine_defaults: ClassVar[dict[str, Any]] = {"betas": (0.9, 0.999), "eps": 1e-8}
    inner_configs: ClassVar[tuple[type, ...]] = (MultiTensorConfig,)

    @classmethod
    def inner_state_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, low_rank: bool
    ) -> int:
        """Two moments: fp32 in the projected space, the parameter's dtype otherwise (as `_init_inner_state`)."""
        return 2 * math.prod(shape) * (4 if low_rank else element_size(dtype))

    @classmethod
    def plain_update_elements(cls, numel: int) -> int:
        """A plain update larger than a chunk runs slice by slice (see `_sliceable`)."""
        return min(numel, cls.foreach_chunk_elements)

    # Storage of the two moments; the 8-bit subclass overrides these methods.
    def _init_inner_state(
        self, state: dict[str, Any], shape: tuple[int, ...], p: torch.Tensor, group: dict[str, Any], low_rank: bool
    ) -> None:
        p = local_tensor(p)
        dtype = torch.float32 if low_rank else p.dtype
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=p.device)

    def _load_moments(self, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: dict[str, Any], exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        """32-bit moments were updated in place: nothing to store."""

    def _load_moments_many(self, states: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
        """The moments of several parameters, to update in place; the third item is handed to `_store_moments_many`."""
        return [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], None

    def _store_moments_many(self, token: Any) -> None:
        """32-bit moments were updated in place: nothing to store."""

    def _rotate_moments(self, state, group, left, right) -> None:
        exp_avg, exp_avg_sq = self._load_moments(state)
        exp_avg.copy_(change_basis(exp_avg, left, right))
        exp_avg_sq.copy_(change_basis(exp_avg_sq, left, right, squared=True))
        self._store_moments(state, exp_avg, exp_avg_sq)

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
        if self._sliceable(p, grad, state):
            self._plain_update_in_slices(p, grad, state, group)
            return
        exp_avg, denom, step_size = self._update_moments(grad, state, group)
        self._apply_plain(p, exp_avg, denom, step_size * self._fallback_scale(group), state, group)

    # A plain AdamW update is elementwise (and 8-bit blocks are independent), so a parameter larger than a chunk (a
    # 7B model's 131M-element embedding) is updated slice by slice: the same numbers, with temporaries (fp32 moments
    # of 8-bit states, the denominator) of one slice instead of several GiB.
    def _sliceable(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any]) -> bool:
        return p.numel() > self.foreach_chunk_elements and p.is_contiguous() and grad.is_contiguous()

    def _slice_length(self, state: dict[str, Any]) -> int:
        return self.foreach_chunk_elements

    def _state_slice(self, state: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """A state dict of views on elements `start:end` of the flattened moments (same step)."""
        return {
            "step": state["step"],
            "exp_avg": state["exp_avg"].view(-1)[start:end],
            "exp_avg_sq": state["exp_avg_sq"].view(-1)[start:end],
        }

    def _plain_update_in_slices(self, p, grad, state: dict[str, Any], group: dict[str, Any]) -> None:
        flat_p, flat_grad, length = p.view(-1), grad.view(-1), self._slice_length(state)
        for start in range(0, p.numel(), length):
            end = min(start + length, p.numel())
            part = self._state_slice(state, start, end)
            exp_avg, denom, step_size = self._update_moments(flat_grad[start:end], part, group)
            step_size *= self._fallback_scale(group)
            self._apply_plain(flat_p[start:end], exp_avg, denom, step_size, part, group)

    def _low_rank_update(self, p, low, state, group, apply_back: ApplyBack) -> None:
        exp_avg, denom, step_size = self._update_moments(low, state, group)
        self._apply_low_rank(p, exp_avg / denom, step_size, state, group, apply_back)

    # Applying an Adam step to the weight; Q-GaLore overrides these for its INT8 weights.
    def _apply_plain(self, p, exp_avg, denom, step_size: float, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Decoupled weight decay, then p -= step_size · exp_avg / denom (`torch.optim.AdamW`)."""
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _apply_plain_many(self, params, exp_avgs, denoms, step_size: float, states, group: dict[str, Any]) -> None:
        """`_apply_plain` of several parameters with one multi-tensor op per stage."""
        if group["weight_decay"] != 0:
            _scale_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-step_size)

    def _apply_low_rank(self, p, direction, step_size: float, state, group, apply_back: ApplyBack) -> None:
        """weight ← (1 − lr·wd) · weight − step_size · scale · back-projected direction, in one `addmm_` (the decay
        costs no extra pass over the weight)."""
        apply_back(direction, -step_size, 1 - group["lr"] * group["weight_decay"])

    # The batched path (foreach=True).
    def _apply_updates(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        """The Adam updates of a whole group, batched: the elementwise moment and denominator math of many parameters
        runs as one multi-tensor op per stage, and 8-bit states are (de)quantised in one call per chunk. Only the
        back-projection (one `addmm_` per projected weight) stays per parameter. Same arithmetic as the per-parameter
        path, operation for operation. Chunks of at most `foreach_chunk_elements` bound the temporaries (`step()`
        already hands over chunks; the layer-wise flush may not)."""
        if not group["foreach"]:
            super()._apply_updates(prepared, group)
            return
        batched = []
        for p, grad in prepared:
            state = self._state_for(p, group)
            if Side(state["side"]) == Side.NONE and self._sliceable(local_tensor(p), grad, state):
                self._apply_update(p, grad, group)  # larger than a chunk: updated in slices
            else:
                batched.append((p, grad))
        for chunk in self._in_chunks(batched):
            self._apply_chunk(chunk, group)

    def _apply_chunk(self, prepared: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        states = [self._state_for(p, group) for p, _ in prepared]
        for state in states:
            state["step"] += 1
        exp_avgs, exp_avg_sqs, token = self._load_moments_many(states)
        # Multi-tensor ops need one device and dtype per list, and the bias correction depends on the step.
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for i, (exp_avg, state) in enumerate(zip(exp_avgs, states)):
            buckets.setdefault((exp_avg.device, exp_avg.dtype, state["step"]), []).append(i)
        for (_, dtype, step), indices in buckets.items():
            avgs, squares = [exp_avgs[i] for i in indices], [exp_avg_sqs[i] for i in indices]
            grads = [prepared[i][1] if prepared[i][1].dtype == dtype else prepared[i][1].to(dtype) for i in indices]
            torch._foreach_lerp_(avgs, grads, 1 - beta1)
            _scale_(squares, beta2)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
            del grads
            bias_correction1, bias_correction2_sqrt = bias_corrections(beta1, beta2, step)
            denoms = torch._foreach_sqrt(squares)
            torch._foreach_div_(denoms, bias_correction2_sqrt)
            torch._foreach_add_(denoms, group["eps"])
            step_size = group["lr"] / bias_correction1
            plain = [k for k, i in enumerate(indices) if Side(states[i]["side"]) == Side.NONE]
            low = [k for k, i in enumerate(indices) if Side(states[i]["side"]) != Side.NONE]
            if plain:
                self._apply_plain_many(
                    [local_tensor(prepared[indices[k]][0]) for k in plain],
                    [avgs[k] for k in plain],
                    [denoms[k] for k in plain],
                    step_size * self._fallback_scale(group),
                    [states[indices[k]] for k in plain],
                    group,
                )
            if low:
                directions = torch._foreach_div([avgs[k] for k in low], [denoms[k] for k in low])
                for k, direction in zip(low, directions):
                    p, state = local_tensor(prepared[indices[k]][0]), states[indices[k]]
                    self._apply_low_rank(p, direction, step_size, state, group, self._back_projector(p, state, group))
        self._store_moments_many(token)


class LowRankAdamW8bit(LowRankAdamW):
    """[`LowRankAdamW`] with both moments stored 8-bit blockwise (dynamic quantisation maps, one absmax per block).

    States with fewer than `min_8bit_size` elements stay fp32. Quantisation goes through bitsandbytes' public
    `quantize_blockwise`/`dequantize_blockwise`; the state holds only the uint8 codes and fp32 absmax tensors.

    Args:
        block_size (`int`, defaults to 256): Elements per quantisation block.
        min_8bit_size (`int`, defaults to 4096): States smaller than this stay fp32.
        **kwargs: See [`LowRankAdamW`].
    """

    inner_configs: ClassVar[tuple[type, ...]] = (*LowRankAdamW.inner_configs, Blockwise8bitConfig)

    #: Beyond the fp32 temporaries: both moments dequantised to fp32 and their concatenated codes.
    update_workspace_bytes: ClassVar[int] = LowRankAdamW.update_workspace_bytes + 10

    @classmethod
    def inner_state_bytes(
        cls, shape: tuple[int, ...], settings: dict[str, Any], dtype: torch.dtype, low_rank: bool
    ) -> int:
        """Two moments of uint8 codes plus one fp32 absmax per `block_size` elements each; fp32 below
        `min_8bit_size` elements (as `_init_inner_state`)."""
        numel = math.prod(shape)
        if numel < settings["min_8bit_size"]:
            return 2 * numel * 4
        return 2 * (numel + 4 * math.ceil(numel / settings["block_size"]))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._store = Blockwise8bitStore()
        super().__init__(*args, **kwargs)

    def _init_inner_state(
        self, state: dict[str, Any], shape: tuple[int, ...], p: torch.Tensor, group: dict[str, Any], low_rank: bool
    ) -> None:
        # The global size decides (a shard of an FSDP2 weight is 8-bit exactly when the whole state would be);
        # blocks are blocks of this process' shard.
        if global_numel(p, shape) < group["min_8bit_size"]:
            super()._init_inner_state(state, shape, p, group, low_rank=True)  # small: fp32
            return
        p, block = local_tensor(p), group["block_size"]
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

    def _slice_length(self, state: dict[str, Any]) -> int:
        if "exp_avg" in state:
            return super()._slice_length(state)
        block = state["exp_avg_block"]
        return max(block, self.foreach_chunk_elements // block * block)  # whole blocks: each keeps its absmax

    def _state_slice(self, state: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        if "exp_avg" in state:
            return super()._state_slice(state, start, end)
        part: dict[str, Any] = {"step": state["step"]}
        for name in ("exp_avg", "exp_avg_sq"):
            block = state[f"{name}_block"]
            part[f"{name}_q"] = state[f"{name}_q"].view(-1)[start:end]
            part[f"{name}_absmax"] = state[f"{name}_absmax"][start // block : -(-end // block)]
            part[f"{name}_block"] = block
        return part

    # ------------------------------------------------------------------------------------------------ checkpoints
    # A row-sharded (FSDP2) 8-bit state is saved on the *global grid*: the codes as a Shard(0) DTensor of the global
    # shape (one per element, so they reshard by rows) and one absmax per block of the whole flattened state, the
    # blocks one process uses. When every shard starts on a block boundary ("aligned": m_k·row a multiple of
    # block_size, which FSDP2's even split gives for the usual power-of-two shapes) that is exactly what each process
    # holds: the absmax becomes a Shard(0) DTensor too, nothing is communicated or requantised, and any number of
    # processes loads it exactly. Otherwise the blocks at the shard boundaries straddle two processes: the save
    # requantises each process' values on the global grid (block maxima all-reduced, one number per block), so the
    # checkpoint is the one-process layout up to one requantisation, and a loader whose shards are not aligned
    # dequantises and requantises its rows into its own blocks. The checkpoint's keys and global shapes are the same
    # for any number of processes, which torch.distributed.checkpoint needs to reshard.

    #: The 8-bit states of this engine, with their quantisation map (signed for the first moment).
    quantized_states: ClassVar[dict[str, bool]] = {"exp_avg": True, "exp_avg_sq": False}

    @staticmethod
    def _grid_is_aligned(rows: int, row: int, block: int, world: int) -> bool:
        """Whether every process' rows of a state (`rows` rows of `row` elements, split as torch.chunk splits them)
        start on a block boundary and hold exactly torch.chunk's split of the global blocks (so the absmax shards
        like a DTensor)."""
        blocks = math.ceil(rows * row / block)
        for (offset, size), (block_offset, block_count) in zip(chunk_split(rows, world), chunk_split(blocks, world)):
            expected = (offset * row // block, math.ceil(size * row / block)) if size else (block_offset, 0)
            if (size and (offset * row) % block) or (block_offset, block_count) != expected:
                return False
        return True

    def _export_sharded_state(self, p: torch.Tensor, sharding: RowSharding, state: dict[str, Any]) -> dict[str, Any]:
        rest, grid = dict(state), {}
        for name, signed in self.quantized_states.items():
            if f"{name}_q" not in state:
                continue
            codes, absmax, block = state[f"{name}_q"], state[f"{name}_absmax"], state[f"{name}_block"]
            row = math.prod(codes.shape[1:])
            if self._grid_is_aligned(sharding.rows, row, block, p.device_mesh.size()):
                grid[f"{name}_absmax"] = row_dtensor(absmax, p, math.ceil(sharding.rows * row / block))
                continue
            # Blocks straddle the shards: requantise this process' values on the global grid (a collective, only
            # for such states).
            values = self._store.load(state, name, signed).reshape(-1)
            start, blocks = sharding.offset * row, math.ceil(sharding.rows * row / block)
            peaks = torch.zeros(blocks, dtype=torch.float32, device=values.device)
            index = torch.arange(start, start + values.numel(), device=values.device) // block
            peaks.scatter_reduce_(0, index, values.abs(), "amax")
            all_reduce(peaks, sharding.group, "max")
            rest[f"{name}_q"] = self._store.quantize_on_grid(values, start, peaks, block, signed).view(codes.shape)
            grid[f"{name}_absmax"] = peaks  # the same on every process after the all-reduce
        exported = super()._export_sharded_state(p, sharding, {k: v for k, v in rest.items() if k not in grid})
        return {key: grid[key] if key in grid else exported[key] for key in state}

    def _import_sharded_state(self, p: torch.Tensor, sharding: RowSharding, saved: dict[str, Any]) -> dict[str, Any]:
        imported = {}
        for name, signed in self.quantized_states.items():
            if f"{name}_q" not in saved:
                continue
            codes, absmax, block = saved[f"{name}_q"], saved[f"{name}_absmax"], int(saved[f"{name}_block"])
            local = rows_of(codes, sharding, f"{name}_q")
            if not is_dtensor(codes) and codes.shape[0] != sharding.rows:
                # This process' own state dict as written before states were DTensors: its own blocks.
                imported[f"{name}_q"], imported[f"{name}_absmax"] = local, absmax
                continue
            row = math.prod(local.shape[1:])
            start, blocks = sharding.offset * row, math.ceil(local.numel() / block)
            aligned = self._grid_is_aligned(sharding.rows, row, block, p.device_mesh.size())
            if is_dtensor(absmax):
                absmax = absmax.to_local() if aligned else absmax.full_tensor()
            elif aligned:  # the whole absmax: this process' blocks
                absmax = absmax[start // block : start // block + blocks]
            if aligned:
                imported[f"{name}_q"], imported[f"{name}_absmax"] = local, absmax
                continue
            values = self._store.dequantize_on_grid(local.reshape(-1), start, absmax, block, signed)
            codes, absmax = self._store.quantize(values.view(local.shape), block, signed)
            imported[f"{name}_q"], imported[f"{name}_absmax"] = codes, absmax
        rest = {k: v for k, v in saved.items() if k not in imported}
        rest = super()._import_sharded_state(p, sharding, rest)
        return {key: imported[key] if key in imported else rest[key] for key in saved}

    def _load_moments_many(self, states: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
        """fp32 states as they are; 8-bit ones dequantised with one call per moment and device (see `load_many`)."""
        exp_avgs: list[torch.Tensor] = [None] * len(states)  # type: ignore[list-item]
        exp_avg_sqs: list[torch.Tensor] = [None] * len(states)  # type: ignore[list-item]
        packs: dict[tuple[Any, ...], list[int]] = {}
        for i, state in enumerate(states):
            if "exp_avg" in state:
                exp_avgs[i], exp_avg_sqs[i] = state["exp_avg"], state["exp_avg_sq"]
            else:
                packs.setdefault((state["exp_avg_q"].device, state["exp_avg_block"]), []).append(i)
        token = []
        for indices in packs.values():
            members = [states[i] for i in indices]
            avgs, packed_avgs = self._store.load_many(members, "exp_avg", signed=True)
            squares, packed_squares = self._store.load_many(members, "exp_avg_sq", signed=False)
            for i, avg, square in zip(indices, avgs, squares):
                exp_avgs[i], exp_avg_sqs[i] = avg, square
            token.append((packed_avgs, packed_squares))
        return exp_avgs, exp_avg_sqs, token

    def _store_moments_many(self, token: Any) -> None:
        for packed_avgs, packed_squares in token:
            self._store.save_many(packed_avgs, signed=True)
            self._store.save_many(packed_squares, signed=False)
