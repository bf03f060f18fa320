"""8-bit blockwise storage of optimizer states through bitsandbytes' public functional API.

A state tensor `name` is kept as `name_q` (uint8 codes, the state's shape), `name_absmax` (fp32, one per block) and
`name_block` (the block size, an int), plain data in `optimizer.state`; the dynamic quantisation map is a constant
rebuilt per device, never stored.

`load_many`/`save_many` (de)quantise the same state of several parameters in one bitsandbytes call: their codes are
concatenated, each parameter's segment padded to a whole number of blocks, so every block still belongs to one
parameter and the result is exactly that of one call per parameter. On a GPU each call is a kernel launch plus
Python overhead, so one call per chunk instead of four per parameter and step is what the batched path saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..utils.imports import require_bitsandbytes


@dataclass
class PackedStates:
    """One state of several parameters, dequantised together into the fp32 buffer `values` (see `load_many`).

    `segments` holds, per parameter, `(state, offset, numel)`: its values are `values[offset:offset + numel]`, the
    rest of its padded segment is zero. `codes`/`absmax` are the concatenated buffers `save_many` quantises into
    (the parameter's own buffers when there is a single unpadded parameter: then nothing is copied back).
    """

    name: str
    block: int
    values: torch.Tensor
    codes: torch.Tensor
    absmax: torch.Tensor
    segments: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)
    shared: bool = False


class Blockwise8bitStore:
    """Quantise/dequantise named states of one optimizer (signed map for moments, unsigned for squares)."""

    def __init__(self) -> None:
        require_bitsandbytes("An 8-bit hf_galore optimizer")
        import bitsandbytes.functional as bnb_functional

        self._functional = bnb_functional
        self._maps: dict[tuple[str, bool], torch.Tensor] = {}

    def _map(self, device: torch.device, signed: bool) -> torch.Tensor:
        key = (str(device), signed)
        if key not in self._maps:
            self._maps[key] = self._functional.create_dynamic_map(signed=signed).to(device)
        return self._maps[key]

    def init(
        self, state: dict[str, Any], name: str, shape: tuple[int, ...], device: torch.device, block: int, signed: bool
    ) -> None:
        """Store a zero state of `shape` (zero is exactly representable: absmax 0 decodes to 0)."""
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)
        state[f"{name}_absmax"] = torch.zeros(math.ceil(zeros.numel() / block), dtype=torch.float32, device=device)
        state[f"{name}_q"] = torch.zeros(shape, dtype=torch.uint8, device=device)
        state[f"{name}_block"] = block
        self.save(state, name, zeros, signed)

    def load(self, state: dict[str, Any], name: str, signed: bool) -> torch.Tensor:
        """The fp32 value of state `name` (a fresh tensor)."""
        codes, absmax, block = state[f"{name}_q"], state[f"{name}_absmax"], state[f"{name}_block"]
        return self._functional.dequantize_blockwise(
            codes, absmax=absmax, code=self._map(codes.device, signed), blocksize=block
        )

    def save(self, state: dict[str, Any], name: str, value: torch.Tensor, signed: bool) -> None:
        """Quantise the fp32 `value` into state `name` (in place into the existing buffers)."""
        codes, absmax, block = state[f"{name}_q"], state[f"{name}_absmax"], state[f"{name}_block"]
        self._functional.quantize_blockwise(
            value.contiguous(), code=self._map(value.device, signed), absmax=absmax, out=codes, blocksize=block
        )

    def quantize(self, values: torch.Tensor, block: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`(codes, absmax)` of the fp32 `values` in blocks of `block` elements (codes shaped like `values`)."""
        codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
        absmax = torch.empty(math.ceil(values.numel() / block), dtype=torch.float32, device=values.device)
        self._functional.quantize_blockwise(
            values.contiguous(), code=self._map(values.device, signed), absmax=absmax, out=codes, blocksize=block
        )
        return codes, absmax

    # A row-sharded state holds elements start .. start + L of the whole flattened state. "The global grid" is the
    # blocks one process holding the whole state uses (element i in block i // block); a shard that does not start
    # on a block boundary shares its first and last block with its neighbours.
    def quantize_on_grid(
        self, values: torch.Tensor, start: int, absmax: torch.Tensor, block: int, signed: bool
    ) -> torch.Tensor:
        """The uint8 codes of the flat fp32 `values` (elements `start:` of a state) on the global grid, given the
        global grid's `absmax` (each block's max |value| over every process' elements): the codes of these elements
        that one process holding the whole state would store."""
        if not values.numel():
            return torch.empty(0, dtype=torch.uint8, device=values.device)
        front, first = start % block, start // block
        padded = values.new_zeros(math.ceil((front + values.numel()) / block) * block)
        padded[front : front + values.numel()] = values
        # The slots of the first and last block that other processes hold get the block's global maximum, so
        # bitsandbytes quantises each block with its global absmax and rounds these elements as one process would.
        padded[:front] = absmax[first]
        padded[front + values.numel() :] = absmax[first + padded.numel() // block - 1]
        codes, _ = self.quantize(padded, block, signed)
        return codes[front : front + values.numel()]

    def dequantize_on_grid(
        self, codes: torch.Tensor, start: int, absmax: torch.Tensor, block: int, signed: bool
    ) -> torch.Tensor:
        """The fp32 values of flat `codes` (elements `start:` of a state) quantised on the global grid with its
        `absmax` (one per global block)."""
        if not codes.numel():
            return torch.empty(0, dtype=torch.float32, device=codes.device)
        front, first = start % block, start // block
        padded = codes.new_zeros(math.ceil((front + codes.numel()) / block) * block)
        padded[front : front + codes.numel()] = codes
        scales = absmax[first : first + padded.numel() // block].to(torch.float32).contiguous()
        values = self._functional.dequantize_blockwise(
            padded, absmax=scales, code=self._map(codes.device, signed), blocksize=block
        )
        return values[front : front + codes.numel()]

    def load_many(
        self, states: list[dict[str, Any]], name: str, signed: bool
    ) -> tuple[list[torch.Tensor], PackedStates]:
        """The fp32 values of state `name` of every state dict in `states` (all on one device, one block size), as
        views into one buffer dequantised by a single call. Update them in place, then call `save_many`."""
        block = states[0][f"{name}_block"]
        if any(state[f"{name}_block"] != block for state in states):
            raise ValueError(f"load_many needs one block size, got {sorted({s[f'{name}_block'] for s in states})}.")
        first_codes = states[0][f"{name}_q"]
        if len(states) == 1 and first_codes.numel() % block == 0:
            codes, absmax = first_codes.view(-1), states[0][f"{name}_absmax"]
            segments, shared = [(states[0], 0, codes.numel())], True
        else:
            code_parts, absmax_parts, segments, offset = [], [], [], 0
            for state in states:
                state_codes = state[f"{name}_q"].view(-1)
                numel = state_codes.numel()
                padded = math.ceil(numel / block) * block
                code_parts.append(state_codes)
                if padded > numel:
                    code_parts.append(state_codes.new_zeros(padded - numel))
                absmax_parts.append(state[f"{name}_absmax"])
                segments.append((state, offset, numel))
                offset += padded
            codes, absmax, shared = torch.cat(code_parts), torch.cat(absmax_parts), False
        values = self._functional.dequantize_blockwise(
            codes, absmax=absmax, code=self._map(codes.device, signed), blocksize=block
        )
        views = []
        for state, offset, numel in segments:
            padded = math.ceil(numel / block) * block
            if padded > numel:  # padding must quantise to nothing: zero keeps each block's absmax unchanged
                values[offset + numel : offset + padded].zero_()
            views.append(values[offset : offset + numel].view(state[f"{name}_q"].shape))
        packed = PackedStates(name, block, values, codes, absmax, segments, shared)
        return views, packed

    def save_many(self, packed: PackedStates, signed: bool) -> None:
        """Quantise the (updated) values of `load_many` back into each parameter's state, in one call."""
        self._functional.quantize_blockwise(
            packed.values,
            code=self._map(packed.values.device, signed),
            absmax=packed.absmax,
            out=packed.codes,
            blocksize=packed.block,
        )
        if packed.shared:
            return
        codes, code_sources, absmaxes, absmax_sources = [], [], [], []
        for state, offset, numel in packed.segments:
            first_block = offset // packed.block
            absmax = state[f"{packed.name}_absmax"]
            codes.append(state[f"{packed.name}_q"].view(-1))
            code_sources.append(packed.codes[offset : offset + numel])
            absmaxes.append(absmax)
            absmax_sources.append(packed.absmax[first_block : first_block + absmax.numel()])
        # One multi-tensor copy per dtype (one launch each on CUDA) instead of two copies per parameter.
        torch._foreach_copy_(codes, code_sources)
        torch._foreach_copy_(absmaxes, absmax_sources)
