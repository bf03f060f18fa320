"""GaLore's optimizers: the low-rank skeleton with GaLore's projection knobs ([`GaLoreConfig`]) over an inner engine.

* [`GaLoreAdamW`]: Adam moments of the projected gradient, in fp32 ([`LowRankAdamW`]).
* [`GaLoreAdamW8bit`]: the same moments stored 8-bit blockwise through bitsandbytes' public functional API
  ([`LowRankAdamW8bit`]).
* [`GaLoreAdafactor`]: Adafactor (factored second moment) on the projected gradient ([`LowRankAdafactor`]).
* `*Layerwise`: the same, each weight updated from its post-accumulate-grad hook ([`LayerwiseMixin`]).

Non-projected parameters get exactly the plain inner update (`torch.optim.AdamW`, `transformers.Adafactor`
semantics).
"""

from __future__ import annotations

from typing import ClassVar

from ...optim.adafactor import LowRankAdafactor
from ...optim.adamw import LowRankAdamW, LowRankAdamW8bit
from ...optim.layerwise import LayerwiseMixin
from .config import GaLoreConfig


class GaLoreAdamW(LowRankAdamW):
    """AdamW whose moments live in a rank-r subspace of each projected weight's gradient.

    Non-projected parameters follow `torch.optim.AdamW` exactly (decoupled weight decay before the update,
    bias-corrected moments, `eps` added after the square root).

    Args:
        params (`Iterable`): Parameters or param groups (see [`LowRankOptimizer`]).
        lr (`float`, defaults to 1e-3): Learning rate.
        betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`): Adam's moment coefficients.
        eps (`float`, defaults to 1e-8): Term added to the denominator.
        weight_decay (`float`, defaults to 0.0): Decoupled weight decay on the full weight.
        foreach (`bool`, defaults to `True`): Batch the elementwise work of a group (see [`MultiTensorConfig`]).
        **kwargs: GaLore knobs (`rank`, `update_proj_gap`, `scale`, `proj_type`, `svd`, ...), see [`GaLoreConfig`].

    Example:
        ```python
        >>> groups = [{"params": other_params}, {"params": linear_weights, "low_rank": True}]
        >>> optimizer = GaLoreAdamW(groups, lr=1e-3, rank=8, update_proj_gap=200, scale=0.25)
        ```
    """

    low_rank_config: ClassVar[type] = GaLoreConfig
    #: Steps on FSDP2 (`fully_shard`) row shards: see docs/how_to/fsdp2.md.
    supports_row_sharding: ClassVar[bool] = True


class GaLoreAdamW8bit(LowRankAdamW8bit):
    """[`GaLoreAdamW`] with both moments stored 8-bit blockwise (dynamic quantisation maps, one absmax per block).

    States with fewer than `min_8bit_size` elements stay fp32. Quantisation goes through bitsandbytes' public
    `quantize_blockwise`/`dequantize_blockwise`; the state holds only the uint8 codes and fp32 absmax tensors.

    Args:
        block_size (`int`, defaults to 256): Elements per quantisation block.
        min_8bit_size (`int`, defaults to 4096): States smaller than this stay fp32.
        **kwargs: See [`GaLoreAdamW`].
    """

    low_rank_config: ClassVar[type] = GaLoreConfig
    #: Each process quantises its own shard of the moments (blocks of the local tensor): see docs/how_to/fsdp2.md.
    supports_row_sharding: ClassVar[bool] = True


class GaLoreAdafactor(LowRankAdafactor):
    """Adafactor (Shazeer & Stern, 2018) on the projected gradient; `transformers.Adafactor` semantics elsewhere.

    The second moment of each 2-D (projected) gradient is factored into row and column statistics, so its state is
    r + max(m, n) numbers instead of m·n. The Adafactor knobs are those of [`AdafactorConfig`]; the projection
    knobs those of [`GaLoreConfig`].
    """

    low_rank_config: ClassVar[type] = GaLoreConfig
    #: Steps on FSDP2 (`fully_shard`) row shards, its global means and RMS all-reduced: see docs/how_to/fsdp2.md.
    supports_row_sharding: ClassVar[bool] = True


class GaLoreAdamWLayerwise(LayerwiseMixin, GaLoreAdamW):
    """[`GaLoreAdamW`] stepping each parameter from its post-accumulate-grad hook."""


class GaLoreAdamW8bitLayerwise(LayerwiseMixin, GaLoreAdamW8bit):
    """[`GaLoreAdamW8bit`] stepping each parameter from its post-accumulate-grad hook."""


class GaLoreAdafactorLayerwise(LayerwiseMixin, GaLoreAdafactor):
    """[`GaLoreAdafactor`] stepping each parameter from its post-accumulate-grad hook."""
