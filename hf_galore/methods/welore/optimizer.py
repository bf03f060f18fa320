"""WeLore's optimizers: AdamW over the parameters the LRC/N-LRC split leaves trainable (the LRC factors and the
opted-in norms, biases, embeddings and heads). Nothing is projected: the low rank is in the model (two factors per
LRC), not in the optimizer.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ...modules.low_rank_linear import LowRankLinear
from ...optim.adamw import LowRankAdamW, LowRankAdamW8bit


class WeLoreAdamW(LowRankAdamW):
    """`torch.optim.AdamW` (fp32 moments) over a WeLore-split model's trainable parameters; no projected groups.

    Args:
        params (`Iterable`): Parameters or param groups.
        lr (`float`, defaults to 1e-3), betas (`tuple[float, float]`, defaults to `(0.9, 0.999)`), eps (`float`,
            defaults to 1e-8), weight_decay (`float`, defaults to 0.0): As `torch.optim.AdamW`.
        foreach (`bool`, defaults to `True`): Batch the elementwise work of a group (see [`MultiTensorConfig`]).
    """

    #: The split decides which parameters exist and train: the estimator needs the model as saved after it.
    estimates_converted_model: ClassVar[bool] = True

    @classmethod
    def memory_estimate_refusal(cls, model: nn.Module) -> str | None:
        """A split model (e.g. built from a WeLore checkpoint's config) is plain AdamW over its trainable factors;
        a dense one cannot be split without its weights' singular values, which a meta-device model lacks."""
        if any(isinstance(m, LowRankLinear) for m in model.modules()):
            return None
        return (
            "its LRC/N-LRC split depends on the weights' singular values, which a meta-device model does not have; "
            "estimate a WeLore checkpoint instead (the folder `hf-galore welore compress` or `Trainer.save_model` "
            "writes), or run `hf-galore welore analyze MODEL_DIR` for WeLore's memory report"
        )

    #: Its checkpoints were written as `GaLoreAdamW` before WeLore had optimizer classes of its own (same layout).
    legacy_state_kinds: ClassVar[tuple[str, ...]] = ("GaLoreAdamW",)

    #: Steps on FSDP2 (`fully_shard`) row shards: the factors are ordinary parameters, the update is elementwise on
    #: each process' rows, with no collective (see docs/how_to/fsdp2.md).
    supports_row_sharding: ClassVar[bool] = True


class WeLoreAdamW8bit(LowRankAdamW8bit):
    """[`WeLoreAdamW`] with both moments stored 8-bit blockwise (see [`Blockwise8bitConfig`])."""

    estimates_converted_model: ClassVar[bool] = True

    @classmethod
    def memory_estimate_refusal(cls, model: nn.Module) -> str | None:
        """See [`WeLoreAdamW.memory_estimate_refusal`]."""
        return WeLoreAdamW.memory_estimate_refusal(model)

    legacy_state_kinds: ClassVar[tuple[str, ...]] = ("GaLoreAdamW8bit",)

    #: Each process quantises its own rows of the moments (blocks of the local tensor): see docs/how_to/fsdp2.md.
    supports_row_sharding: ClassVar[bool] = True
