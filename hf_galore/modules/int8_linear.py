"""`Int8Linear`: a Linear whose weight is stored as group-wise INT8 codes, trained by Q-GaLore.

Storage (all registered buffers, so `.to()`, `state_dict()`, safetensors and `save_pretrained` carry them):

* `qweight`: uint8 codes, `(out_features, in_features)`;
* `weight_scales`, `weight_zeros`: fp32, one per group of `group_size` consecutive (row-major) elements;
* `bias`: an ordinary float `nn.Parameter` (trained by the plain inner optimizer).

The forward pass dequantizes the weight in the activation dtype. The weight gradient reaches the optimizer through
autograd itself: the module owns `grad_carrier`, a float `nn.Parameter` of the weight's shape that costs one element
of memory (a zero-stride `expand` of a 0-d zero). The custom autograd function returns the dense weight gradient as
the carrier's gradient, so autograd accumulates it into `grad_carrier.grad` like any other parameter's. Hence the
Trainer's `model.zero_grad()`, gradient clipping, gradient accumulation and post-accumulate-grad hooks (layer-wise
mode) all work unchanged, and nothing is hung on a tensor as an attribute. The optimizer finds the module that owns
a carrier with [`owner_of`] (a weak mapping filled at construction) and writes the updated weight back with
[`Int8Linear.set_weight_`].

The carrier is not data: it is left out of `state_dict()` and ignored by `load_state_dict()`, and `.to()` / `.half()`
rebuild it as a zero-stride view instead of materialising an m×n tensor. `.to(dtype)` casts neither the codes
(integers) nor the fp32 scales and zeros, so the stored weight never changes when the model is cast.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..projection.quant import dequantize, num_groups, quantize

# id(carrier) -> module, held weakly; `owner_of` checks identity, so a reused id never maps to a stranger. (A
# WeakKeyDictionary keyed by the tensor would compare tensors with `==`, which is elementwise.)
_OWNERS: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()

#: Buffers that follow the module's device but never its dtype.
FIXED_DTYPE_BUFFERS = ("weight_scales", "weight_zeros")


def owner_of(carrier: torch.Tensor) -> Int8Linear | None:
    """The [`Int8Linear`] whose `grad_carrier` is `carrier`, or None for any other tensor."""
    module = _OWNERS.get(id(carrier))
    return module if module is not None and module.grad_carrier is carrier else None


def _zero_carrier(shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    # One element of storage seen as (out, in) through zero strides: a parameter of the weight's shape for autograd.
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


class _Int8LinearFunction(torch.autograd.Function):
    """`y = x Wᵀ + b` with `W` dequantized on the fly; the weight gradient is returned for the carrier."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        carrier: torch.Tensor,
        bias: torch.Tensor | None,
        module: Int8Linear,
    ) -> torch.Tensor:
        weight = module.dequantize_weight(x.dtype)
        # Keep the codes, not the dequantized weight: the m×n float copy would cost what INT8 storage saves.
        ctx.module = module
        ctx.save_for_backward(x, module.qweight, module.weight_scales, module.weight_zeros)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, codes, scales, zeros = ctx.saved_tensors
        module: Int8Linear = ctx.module
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(codes, scales, zeros, module.group_size, grad_out.dtype)
            grad_x = (grad_out @ weight).to(x.dtype)
        flat_g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            grad_w = flat_g.T @ flat_x  # dense (out, in); autograd casts it to the carrier's dtype
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_g.sum(dim=0)
        return grad_x, grad_w, grad_b, None


class Int8Linear(nn.Module):
    """A Linear layer with a group-wise INT8 weight, trainable through its `grad_carrier` (see the module doc).

    Args:
        in_features (`int`): Input size.
        out_features (`int`): Output size.
        bias (`bool`, defaults to `True`): Whether the layer has a (float, trainable) bias.
        group_size (`int`, defaults to 256): Elements (row-major) sharing one scale and zero.
        bits (`int`, defaults to 8): Only 8 is supported.
        dtype (`torch.dtype`, defaults to `torch.float32`): dtype of the bias and of the weight gradient.
        device (`torch.device`, *optional*): Device of every tensor.

    Example:
        ```python
        >>> layer = Int8Linear.from_linear(nn.Linear(64, 32))
        >>> layer(torch.randn(4, 64)).sum().backward()
        >>> layer.grad_carrier.grad.shape
        torch.Size([32, 64])
        ```
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 256,
        bits: int = 8,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits != 8:
            raise ValueError(f"Int8Linear supports bits=8 only, got {bits}. Set weight_bits=8.")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.bits = bits
        groups = num_groups(in_features * out_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.ones(groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zeros", torch.zeros(groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.grad_carrier = nn.Parameter(_zero_carrier((out_features, in_features), dtype, device))
        _OWNERS[id(self.grad_carrier)] = self
        self._register_state_dict_hook(_drop_carrier_from_state_dict)

    # ------------------------------------------------------------------------------------------------ build
    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256, bits: int = 8) -> Int8Linear:
        """Quantize `linear`'s weight (round to nearest); the bias is copied; the carrier takes the weight's dtype."""
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            bits=bits,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            module.set_weight_(weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        if module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ordinary `nn.Linear` holding the dequantized weight (in `dtype`, default the carrier's) and the bias."""
        dtype = dtype or self.grad_carrier.dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.qweight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------------------------------------------ weight
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a fresh float tensor of `dtype`."""
        return dequantize(self.qweight, self.weight_scales, self.weight_zeros, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized *copy* of the weight (writing to it changes nothing; use [`set_weight_`])."""
        return self.dequantize_weight(self.grad_carrier.dtype)

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Requantize `weight` into the buffers in place (stochastic rounding when `generator` is given)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"Expected a weight of shape {(self.out_features, self.in_features)}, got {weight.shape}."
            )
        codes, scales, zeros = quantize(weight, self.bits, self.group_size, generator)
        self.qweight.copy_(codes)
        self.weight_scales.copy_(scales)
        self.weight_zeros.copy_(zeros)

    # ------------------------------------------------------------------------------------------------ nn.Module
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.grad_carrier, self.bias, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Int8Linear:
        # Run `fn` (a `.to()`, `.half()`, `.cuda()`, `to_empty` ...) on everything but the carrier and the fp32
        # scales/zeros; then move those by hand so the carrier stays a one-element view and the scales stay fp32.
        params, buffers = self._parameters, self._buffers
        carrier = params["grad_carrier"]
        self._parameters = {k: v for k, v in params.items() if k != "grad_carrier"}
        self._buffers = {k: v for k, v in buffers.items() if k not in FIXED_DTYPE_BUFFERS}
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.zeros((), dtype=carrier.dtype, device=carrier.device))
        finally:
            moved_params, moved_buffers = self._parameters, self._buffers
            self._parameters = {k: (carrier if k == "grad_carrier" else moved_params[k]) for k in params}
            self._buffers = {k: (buffers[k] if k in FIXED_DTYPE_BUFFERS else moved_buffers[k]) for k in buffers}
        for name in FIXED_DTYPE_BUFFERS:
            tensor = self._buffers[name]
            # A meta tensor (`to_empty` after a meta-device init) has no values to move: start from ones.
            moved = torch.ones_like(tensor, device=probe.device) if tensor.is_meta else tensor.to(probe.device)
            self._buffers[name] = moved
        # Keep the Parameter object (optimizers hold it); only its data becomes a view on the new device/dtype.
        carrier.data = _zero_carrier((self.out_features, self.in_features), probe.dtype, probe.device)
        return self

    def carrier_to_codes_device_(self) -> None:
        """Move the carrier to the codes' device, keeping its dtype (e.g. off the meta device after a loader filled
        the buffers of a module built there; the carrier is never in a checkpoint, so no loader moves it)."""
        old = self.grad_carrier
        if old.device == self.qweight.device:
            return
        # A new Parameter: `.data` cannot change a tensor's device type (meta -> cpu). Nothing holds the old one yet.
        self.grad_carrier = nn.Parameter(
            _zero_carrier((self.out_features, self.in_features), old.dtype, self.qweight.device), old.requires_grad
        )
        _OWNERS[id(self.grad_carrier)] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A deep copy or an unpickled module has a new carrier: register its owner again.
        super().__setstate__(state)
        _OWNERS[id(self.grad_carrier)] = self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "grad_carrier"
        carrier_given = state_dict.pop(key, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if carrier_given is not None:
            state_dict[key] = carrier_given
        if key in missing_keys:
            missing_keys.remove(key)  # the carrier holds no data


def _drop_carrier_from_state_dict(
    module: Int8Linear, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> dict[str, Any]:
    state_dict.pop(prefix + "grad_carrier", None)
    return state_dict
