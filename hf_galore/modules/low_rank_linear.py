"""A Linear layer stored as two low-rank factors (WeLore's Low-Rank Component).

`y = up(down(x))` with `down.weight = √S_k V_kᵀ` (k × in) and `up.weight = U_k √S_k` (out × k), where
`W = U S Vᵀ` is the SVD of the original weight. By Eckart–Young, `up.weight @ down.weight` is the best rank-k
approximation of `W` in Frobenius and spectral norm; at `k = min(out, in)` it equals `W` up to fp32 round-off.

Splitting `√S` evenly between the factors keeps both factors on the same scale, so a single learning rate suits
both when they are fine-tuned. The original bias is kept on the output factor `up`, so the layer computes
`W_k x + b` exactly like the dense layer it replaces.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidConfigError


class LowRankLinear(nn.Module):
    """`nn.Linear` replacement computing `up(down(x))`, i.e. the weight `up.weight @ down.weight` plus the bias.

    Args:
        in_features (`int`): Size of each input sample.
        out_features (`int`): Size of each output sample.
        rank (`int`): Inner dimension k of the factorisation, `1 ≤ rank ≤ min(in_features, out_features)`.
        bias (`bool`, defaults to `True`): Whether the output factor carries a bias.
        device (`torch.device`, *optional*): Device of the factors.
        dtype (`torch.dtype`, *optional*): Dtype of the factors.

    Attributes:
        down (`nn.Linear`): The input factor `√S_k V_kᵀ`, shape `(rank, in_features)`, no bias.
        up (`nn.Linear`): The output factor `U_k √S_k`, shape `(out_features, rank)`, with the original bias.

    Example:
        ```python
        >>> dense = nn.Linear(64, 32)
        >>> low = LowRankLinear.from_linear(dense, rank=8)  # best rank-8 approximation, bias kept
        >>> low(torch.randn(4, 64)).shape
        torch.Size([4, 32])
        ```
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise InvalidConfigError(
                f"LowRankLinear rank={rank} is out of range for a {out_features}×{in_features} weight; it must be "
                f"between 1 and min(out, in) = {min(in_features, out_features)}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, rank: int) -> LowRankLinear:
        """Best rank-`rank` factorisation of a dense `(out, in)` weight; dtype and device follow `weight`.

        The SVD runs in fp32 whatever the weight's dtype (bf16/fp16 SVDs are unsupported or inaccurate); the
        factors are cast back to the weight's dtype afterwards.
        """
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            root = s[:rank].sqrt()
            module.up.weight.copy_(u[:, :rank] * root)  # U_k √S_k
            module.down.weight.copy_(root[:, None] * vh[:rank])  # √S_k V_kᵀ
            if bias is not None:
                module.up.bias.copy_(bias.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Replace-ready low-rank copy of `linear` (see [`~LowRankLinear.from_weight`]); `linear` is untouched."""
        return cls.from_weight(linear.weight, linear.bias, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def merged_weight(self) -> torch.Tensor:
        """The dense `(out, in)` weight `up.weight @ down.weight`, computed in fp32 and cast to the factors' dtype."""
        with torch.no_grad():
            return (self.up.weight.float() @ self.down.weight.float()).to(self.up.weight.dtype)

    def to_linear(self) -> nn.Linear:
        """A dense `nn.Linear` computing the same function (weight = [`merged_weight`], same bias)."""
        weight = self.up.weight
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.up.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight())
            if self.up.bias is not None:
                linear.bias.copy_(self.up.bias)
        return linear

    @property
    def num_dense_parameters(self) -> int:
        """Weight entries of the dense layer this replaces (`out × in`)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
