"""8-bit blockwise storage of optimizer states through bitsandbytes' public functional API.

A state tensor `name` is kept as `name_q` (uint8 codes, the state's shape), `name_absmax` (fp32, one per block) and
`name_block` (the block size, an int), plain data in `optimizer.state`; the dynamic quantisation map is a constant rebuilt per device, never stored.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..utils.imports import require_bitsandbytes


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
